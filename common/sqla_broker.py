"""kombu's SQLAlchemy transport, polling every 0.1 s instead of every second (the embedded broker).

The poll interval cannot be set through broker_transport_options: this transport hands those to
create_engine, which rejects the key. A subclass is the only knob; 10 small SELECTs a second on a
local SQLite file cost nothing, and a new batch's first message no longer waits up to a second.
"""

from kombu.transport.sqlalchemy import Transport as _SQLAlchemyTransport


class Transport(_SQLAlchemyTransport):
    polling_interval = 0.1
