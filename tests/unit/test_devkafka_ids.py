"""devkafka's cluster ids: never one that `kafka-storage format -t` reads as an option."""

from __future__ import annotations

import uuid

from kaireon_pub import devkafka


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch):
    # 0xF8: the first six bits are 62, '-' in URL-safe base64; one id in 64 starts so.
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x10" + bytes(15))])
    monkeypatch.setattr(devkafka.uuid, "uuid4", lambda: next(drawn))
    cluster_id = devkafka._random_cluster_id()
    assert cluster_id == "EAAAAAAAAAAAAAAAAAAAAA"
    assert len(cluster_id) == 22


def test_the_dash_case_is_real():
    import base64

    assert base64.urlsafe_b64encode(b"\xf8" + bytes(15)).decode().startswith("-")
