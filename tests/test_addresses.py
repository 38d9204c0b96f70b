"""One rule for peer addresses against networks (listener allow-lists, routes)."""

from pacs_ai.network.addresses import address_in, parse_networks


def test_addresses_in_networks_ipv4_ipv6_mapped_and_scoped():
    networks = parse_networks(["10.1.2.0/24", "fd00::7", "192.168.1.7"])
    assert address_in("10.1.2.200", networks)
    assert address_in("::ffff:10.1.2.3", networks)  # IPv4 peer on an IPv6 socket
    assert address_in("fd00::7%eth0", networks)  # the scope is ignored
    assert address_in("192.168.1.7", networks)
    assert not address_in("10.1.3.1", networks)
    assert not address_in("fd00::8", networks)
    assert not address_in("not-an-address", networks)
    assert not address_in("10.1.2.1", [])
