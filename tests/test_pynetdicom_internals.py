"""What pacs_ai.network.pynetdicom_internals touches still exists in the installed pynetdicom, with the
signatures and call paths it relies on. A new pynetdicom release that changes any of it fails
here, by name, before the listener's behaviour tests (test_listener, test_sockets) fail in a
less obvious way. When this fails: read the new release's code for that internal, fix
pynetdicom_internals.py, move the pin in pyproject.toml, and update docs/architecture.md ("Library
internals we rely on, and why")."""

from __future__ import annotations

import inspect
import io
import queue
import socket
import socketserver
import tomllib

import pynetdicom
from pynetdicom import AE, _config, dimse_messages, dul, fsm
from pynetdicom.association import Association
from pynetdicom.transport import AssociationServer, AssociationSocket, ThreadedAssociationServer

from pacs_ai.network import pynetdicom_internals as internals
from testbed.environment import REPO_ROOT


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_installed_pynetdicom_is_the_pinned_series():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    [pin] = [d for d in pyproject["project"]["dependencies"] if d.startswith("pynetdicom")]
    assert pin.split(",")[0] == "pynetdicom>=3.0" and pin.split(",")[1].startswith("<3.1")
    assert pynetdicom.__version__.startswith("3.0.")


def test_an_association_has_the_dul_socket_and_queue_we_use():
    association = Association(AE(), "acceptor")
    assert isinstance(association.dul, dul.DULServiceProvider)
    assert association.dul.socket is None and internals.transport(association) is None
    assert internals.os_socket(association) is None
    assert isinstance(association.dul.to_user_queue, queue.Queue)
    ours, peer = socket.socketpair()
    try:
        association.dul.socket = AssociationSocket(association, client_socket=ours)
        assert internals.os_socket(association) is ours
    finally:
        ours.close()
        peer.close()


def test_the_dul_reads_each_pdu_through_association_socket_recv():
    """replace_pdu_reader works because the DUL calls `self.socket.recv(n)` per read."""
    assert parameters(AssociationSocket.recv) == ["self", "nr_bytes"]
    assert "self.socket.recv(" in inspect.getsource(dul.DULServiceProvider._read_pdu_data)
    association = Association(AE(), "acceptor")
    assert internals.replace_pdu_reader(association, lambda n: bytearray()) is False
    ours, peer = socket.socketpair()
    try:
        association.dul.socket = AssociationSocket(association, client_socket=ours)
        peer.sendall(b"abc")
        assert internals.replace_pdu_reader(association, lambda n: bytearray(b"x" * n))
        assert association.dul.socket.recv(2) == bytearray(b"xx")
    finally:
        ours.close()
        peer.close()


def test_received_p_data_goes_through_dimse_receive_primitive_into_message():
    """after_each_received_fragment wraps `dimse.receive_primitive`, which the state machine
    calls for each P-DATA; the partial message is `dimse.message`, its bytes so far in
    `encoded_command_set` and `data_set`."""
    assert "dimse.receive_primitive(" in inspect.getsource(fsm)
    association = Association(AE(), "acceptor")
    assert parameters(association.dimse.receive_primitive) == ["primitive"]
    assert association.dimse.message is None
    assert internals.message_in_progress(association) is None
    message = dimse_messages.DIMSEMessage()
    assert isinstance(message.encoded_command_set, io.BytesIO)
    assert isinstance(message.data_set, io.BytesIO)
    message.data_set.write(b"12345")
    association.dimse.message = message
    assert internals.message_in_progress(association) == (message, 5)
    internals.drop_message_in_progress(association)
    assert association.dimse.message is None
    checked = []
    received = []
    association.dimse.receive_primitive = received.append
    assert internals.after_each_received_fragment(association, lambda: checked.append(1))
    association.dimse.receive_primitive("p-data")
    assert (received, checked) == (["p-data"], [1])


def test_none_on_the_user_queue_reads_as_the_acse_timeout():
    """end_acceptor_wait puts None on `to_user_queue`; the acceptor's wait for its
    A-ASSOCIATE-RQ takes None as the timeout and ends the association."""
    source = inspect.getsource(Association.run_reactor)
    assert "self.dul.receive_pdu(wait=True, timeout=self.acse_timeout)" in source
    assert "if primitive is None:" in source
    association = Association(AE(), "acceptor")
    internals.end_acceptor_wait(association)
    assert association.dul.receive_pdu(wait=False) is None
    assert association.dul.to_user_queue.empty()


def test_the_server_class_extension_point_and_the_servers_list():
    """The listener's server is a ThreadedAssociationServer subclass made by AE.make_server
    and then added to `ae._servers`, as start_server does (shutdown removes it from there)."""
    assert "server_class" in parameters(AE.make_server)
    assert "ThreadedAssociationServer" in inspect.getsource(AE.start_server)
    assert "self._servers.append(server)" in inspect.getsource(AE.start_server)
    assert "self.ae._servers.remove(" in inspect.getsource(AssociationServer.shutdown)
    assert parameters(AssociationServer.get_request) == ["self"]
    assert parameters(ThreadedAssociationServer.verify_request) == \
        parameters(socketserver.BaseServer.verify_request) == ["self", "request", "client_address"]
    ae = AE()
    assert isinstance(ae._servers, list)
    internals.register_server(ae, "server")
    assert ae._servers == ["server"]


def test_the_chunked_send_setting_exists():
    assert isinstance(_config.STORE_SEND_CHUNKED_DATASET, bool)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    try:
        internals.send_datasets_from_file_in_chunks()
        assert _config.STORE_SEND_CHUNKED_DATASET is True
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def test_no_other_pacs_ai_module_reaches_into_pynetdicom_internals():
    """The door stays the only one: no pacs_ai module but pynetdicom_internals imports
    pynetdicom's private modules or touches an association's `dul`, `dimse` or `to_user_queue`."""
    import re

    offenders = []
    for path in sorted((REPO_ROOT / "pacs_ai").rglob("*.py")):
        if path.name == "pynetdicom_internals.py":
            continue
        text = path.read_text()
        if re.search(r"pynetdicom(\.| import )_\w+|\.(dul|dimse)\b|to_user_queue"
                     r"|getattr\(\w+, [\"'](dul|dimse)[\"']", text):
            offenders.append(path.name)
    assert offenders == []
