"""hdfmgr: the handoff buffer manager.

Moves image files from a handoff buffer to a remote endpoint buffer so that each one appears
there atomically, complete and verified, and once; then moves the local copy to holding.
"""

__version__ = "1.0.0"
