"""The benchmark as a small package (run it through ``scripts/bench``).

- util.py: clocks, polling, hashing, process figures
- consumer.py: the endpoint's consumer (inotify arrivals, hashing every file as it appears)
- site.py: a measured site, the daemon under test, a transport's templates
- relay.py: the long link (a TCP relay delaying every chunk)
- context.py: the run context and one measured hdfmgr run with its correctness check
- references.py: floor, bound, ideal pipeline, naive, lsyncd
- transports/: one module per transport (local, scp, rsync, ...)
- workloads/: one module per workload (backlog, trickle, scale, longlink, ...)
- report.py: the Markdown report (pure)
- main.py: the command line and the driver
"""
