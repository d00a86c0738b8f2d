-- Headers must be a JSON object (name -> value). enqueue() only writes objects; this stops plain
-- SQL from writing anything else. NOT VALID: rows already there are not checked (a restore may
-- hold some); the publisher fails such a row alone, with a reason, whatever its shape.
ALTER TABLE outbox_events
    ADD CONSTRAINT outbox_events_headers_is_object CHECK (jsonb_typeof(headers) = 'object') NOT VALID;
