"""Which network addresses layertrack may connect to on a user's behalf.

A URL given to the service (a webhook target, an http(s) checkpoint) must not become a way
to reach internal services: a host that resolves to a private, loopback, link-local or
otherwise non-public address is refused unless an allow list names it (its name, the
address, or a network holding it). An IPv6 address that embeds an IPv4 one (NAT64,
IPv4-mapped, 6to4, Teredo, ...) is judged, and matched against the allow list, by that IPv4.

Standard library only; both sides use it (service/webhooks.py and workers/stores.py).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: IPv6 ranges whose addresses carry an IPv4 address in their last 32 bits: NAT64's
#: well-known prefix (RFC 6052), IPv4-translated (SIIT, RFC 2765) and the deprecated
#: IPv4-compatible form (``::a.b.c.d``, RFC 4291). A target there is judged by that IPv4.
_LOW32_EMBEDDED = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96"))
#: the local-use NAT64 prefix (RFC 8215): translated by the site's own gateway, never public
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


class AddressRefused(ValueError):
    """A host resolves to a non-public address the allow list does not name. ``str()`` says
    which (``host 'x' resolves to the non-public address 10.0.0.1``); callers add advice."""

    def __init__(self, host: str, addr: Address):
        inner = embedded_ipv4(addr)
        also = f" (which embeds {', '.join(map(str, inner))})" if inner else ""
        super().__init__(f"host {host!r} resolves to the non-public address {addr}{also}")
        self.host, self.addr = host, addr


class Unresolvable(ValueError):
    """A host name that does not resolve."""


def embedded_ipv4(addr: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for: IPv4-mapped (``::ffff:a.b.c.d``),
    NAT64, IPv4-translated, IPv4-compatible, 6to4 (``2002:AABB:CCDD::``) and Teredo
    (``2001:0::/32``: its server and its de-obfuscated client). [] for anything else."""
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    found = []
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if int(addr) > 1 and any(addr in net for net in _LOW32_EMBEDDED):  # not :: or ::1 (judged as they are)
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    return found


def allow_list(allow_hosts: str) -> list[str]:
    """The entries of a comma-separated allow list (host names, addresses, networks)."""
    return [a.strip() for a in allow_hosts.split(",") if a.strip()]


def allowed(host: str, addr: Address, allow: Sequence[str]) -> bool:
    """Whether ``allow`` names ``host``, ``addr``, an IPv4 address it embeds, or a network
    holding one of them."""
    candidates = [addr, *embedded_ipv4(addr)]
    for entry in allow:
        if entry.lower() == host.lower():
            return True
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if any(a.version == net.version and a in net for a in candidates):
            return True
    return False


def is_private(addr: Address) -> bool:
    """Not a public unicast address: private, loopback, link-local, reserved, multicast, the
    local-use NAT64 prefix, or an IPv6 address that embeds such an IPv4 address."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return is_private(addr.ipv4_mapped)
    if not addr.is_global or addr.is_multicast or addr in _LOCAL_NAT64:
        return True
    return any(is_private(v4) for v4 in embedded_ipv4(addr))


def check_address(host: str, addr: Address | str, allow_hosts: str | Sequence[str]) -> None:
    """AddressRefused when ``addr`` (an address ``host`` resolved to) is non-public and not
    allow-listed."""
    if isinstance(addr, str):
        addr = ipaddress.ip_address(addr.split("%", 1)[0])
    allow = allow_list(allow_hosts) if isinstance(allow_hosts, str) else list(allow_hosts)
    if is_private(addr) and not allowed(host, addr, allow):
        raise AddressRefused(host, addr)


def resolve_checked(host: str, port: int, allow_hosts: str | Sequence[str]) -> list[tuple]:
    """``socket.getaddrinfo(host, port)`` (TCP) after checking every address it gives:
    AddressRefused if any is non-public and not allow-listed, Unresolvable if none."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise Unresolvable(f"cannot resolve the host {host!r}: {e.strerror}") from None
    for info in infos:
        check_address(host, info[4][0], allow_hosts)
    return infos
