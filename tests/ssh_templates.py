"""The seed's command templates adapted to the loopback sshd fixture (``tests/sshd_fixture.py``).

The values come in as endpoint parameters (``{user}``, ``{host}``, ``{port}``, ``{key}``,
``{known_hosts}``), as an operator's configuration would pass them.
"""

from __future__ import annotations

from tests.sshd_fixture import SshServer

#: Client options shared by ssh, scp and rsync's ssh: ignore ~/.ssh/config, pin the host key
#: (strict checking against the fixture's known_hosts only), never prompt, offer only {key}.
SSH_OPTS = (
    "-F /dev/null -o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null"
    " -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes"
)
SCP_EACH = "scp -Bpq -P {port} -i {key} " + SSH_OPTS + " {file} {user}@{host}:{dest}"
SCP_BATCH = "scp -Bpq -P {port} -i {key} " + SSH_OPTS + " {batch} {user}@{host}:{dest}"
RSYNC = 'rsync -a -e "ssh -p {port} -i {key} ' + SSH_OPTS + '" {batch} {user}@{host}:{dest}'
REMOTE = "ssh -p {port} -i {key} " + SSH_OPTS + ' {user}@{host} "{command}"'

#: Connection sharing, as in etc/config.yaml: the first command starts a master that the
#: following ones reuse; {cpath} is the control socket path.
SHARE = "-o ControlMaster=auto -o ControlPath={cpath} -o ControlPersist=60"
RSYNC_SHARED = (
    'rsync -a -e "ssh -p {port} -i {key} ' + SSH_OPTS + " " + SHARE + '" {batch} {user}@{host}:{dest}'
)
REMOTE_SHARED = "ssh -p {port} -i {key} " + SSH_OPTS + " " + SHARE + ' {user}@{host} "{command}"'


def params(sshd: SshServer, **extra: object) -> dict[str, object]:
    """Endpoint parameters that point the templates above at the fixture."""
    return {
        "user": sshd.user,
        "host": sshd.host,
        "port": sshd.port,
        "key": str(sshd.key),
        "known_hosts": str(sshd.known_hosts),
        **extra,
    }
