"""kaireon-pub: the outbox publisher tier (PostgreSQL outbox_events -> Kafka).

Application side: `enqueue(conn, topic=..., key=..., payload=...)` and `enqueue_many(conn, events)`
write inside the caller's transaction. The tier itself runs as `kaireon-pub run`.
"""

from kaireon_pub.enqueue import Event, enqueue, enqueue_many
from kaireon_pub.errors import PayloadError

__all__ = ["Event", "PayloadError", "enqueue", "enqueue_many"]
__version__ = "0.1.0"
