"""Webhook targets: private addresses are refused however they are written, including IPv6
addresses that embed a private IPv4 address (NAT64, 6to4, IPv4-compatible, IPv4-mapped,
IPv4-translated, Teredo), at subscription and again at delivery time. Literal addresses
only: no DNS is needed."""

from __future__ import annotations

import ipaddress

import pytest
from layertrack.service import webhooks
from layertrack.service.webhooks import TargetRefused, check_target
from layertrack.workers.netpolicy import embedded_ipv4

#: (URL, the private IPv4 address it stands for): every one must be refused
REFUSED = [
    # NAT64, well-known prefix 64:ff9b::/96 (RFC 6052)
    ("http://[64:ff9b::7f00:1]/hook", "127.0.0.1"),
    ("http://[64:ff9b::127.0.0.1]/hook", "127.0.0.1"),
    ("http://[64:ff9b::a00:1]/hook", "10.0.0.1"),
    ("http://[64:ff9b::ac10:fe01]/hook", "172.16.254.1"),
    ("https://[64:ff9b::c0a8:101]:8443/hook", "192.168.1.1"),
    ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data", "169.254.169.254"),  # cloud metadata
    ("http://[64:ff9b::6440:1]/hook", "100.64.0.1"),  # carrier-grade NAT
    ("http://[64:ff9b::0:0]/hook", "0.0.0.0"),
    # NAT64, local-use prefix 64:ff9b:1::/48 (RFC 8215): refused whatever it embeds
    ("http://[64:ff9b:1::a00:1]/hook", "10.0.0.1"),
    ("http://[64:ff9b:1:7f00:0:100::]/hook", "127.0.0.1"),
    ("http://[64:ff9b:1::808:808]/hook", "8.8.8.8"),
    # 6to4, 2002::/16
    ("http://[2002:7f00:1::]/hook", "127.0.0.1"),
    ("http://[2002:7f00:1:0:0:0:0:1]/hook", "127.0.0.1"),
    ("http://[2002:a00:1::1]/hook", "10.0.0.1"),
    ("http://[2002:c0a8:101::]/hook", "192.168.1.1"),
    ("http://[2002:a9fe:a9fe::]/hook", "169.254.169.254"),
    # IPv4-compatible, ::a.b.c.d (deprecated)
    ("http://[::127.0.0.1]/hook", "127.0.0.1"),
    ("http://[::7f00:1]/hook", "127.0.0.1"),
    ("http://[::10.0.0.1]/hook", "10.0.0.1"),
    ("http://[::192.168.0.1]/hook", "192.168.0.1"),
    # IPv4-mapped, ::ffff:a.b.c.d
    ("http://[::ffff:127.0.0.1]/hook", "127.0.0.1"),
    ("http://[::ffff:7f00:1]/hook", "127.0.0.1"),
    ("http://[::ffff:10.1.2.3]/hook", "10.1.2.3"),
    ("http://[0:0:0:0:0:ffff:c0a8:0101]/hook", "192.168.1.1"),
    # IPv4-translated (SIIT), ::ffff:0:a.b.c.d
    ("http://[::ffff:0:7f00:1]/hook", "127.0.0.1"),
    ("http://[::ffff:0:a00:1]/hook", "10.0.0.1"),
    # Teredo, 2001::/32: server 65.54.227.120, client 127.0.0.1 / 10.0.0.1 (bits inverted)
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook", "127.0.0.1"),
    ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/hook", "10.0.0.1"),
    # plain forms, for completeness
    ("http://127.0.0.1/hook", "127.0.0.1"),
    ("http://2130706433/hook", "127.0.0.1"),  # decimal
    ("http://0x7f000001/hook", "127.0.0.1"),  # hexadecimal
    ("http://0177.0.0.1/hook", "127.0.0.1"),  # octal
    ("http://127.1/hook", "127.0.0.1"),  # short form
    ("http://10.0.0.1/hook", "10.0.0.1"),
    ("http://[::1]/hook", None),
    ("http://[fe80::1]/hook", None),
    ("http://[fd00::1]/hook", None),
    ("http://[::]/hook", None),
]

#: public targets, also when written as an IPv6 form of a public IPv4 address
ACCEPTED = [
    "http://8.8.8.8/hook",
    "https://[2606:4700:4700::1111]/hook",
    "http://[64:ff9b::808:808]/hook",  # NAT64 of 8.8.8.8
    "http://[2002:808:808::1]/hook",  # 6to4 of 8.8.8.8
    "http://[::ffff:8.8.8.8]/hook",  # IPv4-mapped 8.8.8.8
]


@pytest.mark.parametrize(("url", "inner"), REFUSED)
def test_private_targets_are_refused_however_written(url, inner):
    with pytest.raises(TargetRefused) as e:
        check_target(url, "")
    message = str(e.value)
    assert "non-public address" in message and "LAYERTRACK_WEBHOOK_ALLOW_HOSTS" in message
    # where the variable goes and what else it takes: the service's environment, a restart
    assert "in the environment of the service" in message and "restart them" in message, message
    if inner and not url.startswith("http://[64:ff9b:1:"):  # local-use NAT64: refused as a whole
        assert inner in message, message  # the address it stands for is named


@pytest.mark.parametrize("url", ACCEPTED)
def test_public_targets_are_accepted(url):
    check_target(url, "")


def test_the_embedded_address_is_what_the_allow_list_is_matched_against():
    check_target("http://[64:ff9b::7f00:1]/hook", "127.0.0.0/8")
    check_target("http://[2002:a00:1::1]/hook", "10.0.0.0/8")
    with pytest.raises(TargetRefused):
        check_target("http://[64:ff9b::7f00:1]/hook", "10.0.0.0/8")


@pytest.mark.parametrize(("addr", "expected"), [
    ("64:ff9b::7f00:1", ["127.0.0.1"]),
    ("2002:a00:1::", ["10.0.0.1"]),
    ("::127.0.0.1", ["127.0.0.1"]),
    ("::ffff:127.0.0.1", ["127.0.0.1"]),
    ("::ffff:0:7f00:1", ["127.0.0.1"]),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", ["65.54.227.120", "127.0.0.1"]),
    ("2606:4700:4700::1111", []),
    ("::1", []),
    ("::", []),
])
def test_embedded_ipv4(addr, expected):
    assert [str(a) for a in embedded_ipv4(ipaddress.ip_address(addr))] == expected


def test_a_target_allowed_at_subscription_is_checked_again_at_delivery(tmp_path):
    """The allow list shrank after the subscription: the delivery is refused, not sent."""
    from layertrack.service.db import get_sessionmaker, upgrade
    from layertrack.service.models import Delivery
    from layertrack.service.settings import Settings

    db = f"sqlite:///{tmp_path / 'lt.db'}"
    upgrade(db)
    settings = Settings(data_dir=tmp_path / "data", database_url=db, webhook_allow_hosts="")
    with get_sessionmaker(db)() as s:
        s.info["settings"] = settings
        w, _secret = webhooks.create(s, url="http://[64:ff9b::7f00:1]:9/hook", events=["webhook.test"], run=None,
                                     secret=None, description="", allow_hosts="127.0.0.0/8")
        delivery_id = webhooks.test_delivery(s, w).id
    assert webhooks.attempt(db, delivery_id, settings) is None  # no retry: refused for good
    with get_sessionmaker(db)() as s:
        d = s.get(Delivery, delivery_id)
        assert d.status == "failed" and d.last_status_code is None
        assert "non-public address 64:ff9b::7f00:1 (which embeds 127.0.0.1)" in d.last_error
        assert [a.error for a in d.attempt_log] == [d.last_error]
