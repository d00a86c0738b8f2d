"""kaireon-pub: the outbox publisher tier (PostgreSQL outbox_events -> Kafka).

Application side: `enqueue(conn, topic=..., key=..., payload=...)` and `enqueue_many(conn, events)`
write inside the caller's transaction (on a psycopg AsyncConnection, `await` them); the record's
value is the payload's bytes (bytes as given, a str's UTF-8, orjson for other values, None a
tombstone). The tier itself runs as `kaireon-pub run`.
"""

from kaireon_pub.enqueue import Event, PendingWrite, enqueue, enqueue_many
from kaireon_pub.errors import ConfigError, PayloadError

__all__ = ["ConfigError", "Event", "PayloadError", "PendingWrite", "enqueue", "enqueue_many"]
__version__ = "0.1.0"
