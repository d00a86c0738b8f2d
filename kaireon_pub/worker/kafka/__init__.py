"""Publishing to Kafka: error kinds (errors), records from rows (records), the producer and its
delivery thread (producer), one batch's delivery reports (delivery, outcome), the per-row loop
(publisher), and the optional OpenTelemetry traces (tracing, spans)."""
