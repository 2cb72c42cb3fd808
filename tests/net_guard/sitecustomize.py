"""A network guard for tests, loaded by Python at start-up (``PYTHONPATH`` = this folder).

Any DNS resolution of a name other than localhost, and any TCP/UDP connect to
a non-loopback address, is written to ``$XTRAIN_NET_GUARD_LOG`` and refused
with OSError. Unix sockets and loopback (wandb's own local service) pass.
"""

import ipaddress, os, socket, traceback
LOG = os.environ.get("XTRAIN_NET_GUARD_LOG")
def _local(host):
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
def _violate(what):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {what}\n" + "".join(traceback.format_stack(limit=12)) + "\n")
    raise OSError(f"network guard: {what}")
_gai = socket.getaddrinfo
def getaddrinfo(host, *a, **k):
    if not _local(host if not isinstance(host, bytes) else host.decode()):
        _violate(f"getaddrinfo({host!r})")
    return _gai(host, *a, **k)
socket.getaddrinfo = getaddrinfo
_ghbn = socket.gethostbyname
def gethostbyname(host):
    if not _local(host):
        _violate(f"gethostbyname({host!r})")
    return _ghbn(host)
socket.gethostbyname = gethostbyname
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _violate(f"connect({address!r})")
    return _connect(self, address)
socket.socket.connect = connect
_connect_ex = socket.socket.connect_ex
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _violate(f"connect_ex({address!r})")
    return _connect_ex(self, address)
socket.socket.connect_ex = connect_ex
