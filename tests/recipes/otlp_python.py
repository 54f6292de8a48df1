"""Sends log records through the OpenTelemetry Python SDK's OTLP/HTTP log
exporter, exactly as an application would: the standard `logging` module,
the SDK's LoggingHandler, a BatchLogRecordProcessor and OTLPLogExporter
(protobuf, gzip) pointed at a DCS agent's /v1/logs.

    python otlp_python.py ENDPOINT COUNT RUN

Each record carries the attributes `recipe.run` (RUN) and `recipe.i` (its
index), which the test looks up in PostgreSQL. Prints `exported=N failed=M`
from the exporter's own results and exits non-zero if any export failed.
"""

import logging
import sys

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
from opentelemetry.sdk.resources import Resource


class CountingExporter(OTLPLogExporter):
    """The real exporter, counting what it reports as exported or failed."""

    exported = 0
    failed = 0

    def export(self, batch):
        result = super().export(batch)
        if result == LogRecordExportResult.SUCCESS:
            CountingExporter.exported += len(batch)
        else:
            CountingExporter.failed += len(batch)
        return result


def main() -> int:
    endpoint, count, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    provider = LoggerProvider(resource=Resource.create({"service.name": "dcs-recipe"}))
    exporter = CountingExporter(endpoint=endpoint, compression=Compression.Gzip, timeout=30)
    # The queue holds every record: the default (2048) drops what a burst
    # of 10,000 log calls adds faster than batches are exported.
    provider.add_log_record_processor(
        BatchLogRecordProcessor(
            exporter,
            max_queue_size=count + 1024,
            max_export_batch_size=512,
            schedule_delay_millis=100,
        )
    )
    handler = LoggingHandler(level=logging.INFO, logger_provider=provider)
    log = logging.getLogger("dcs.recipe")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    for i in range(count):
        log.info("recipe record %d", i, extra={"recipe.run": run, "recipe.i": i})
    provider.force_flush(timeout_millis=120_000)
    provider.shutdown()
    print(f"exported={CountingExporter.exported} failed={CountingExporter.failed}", flush=True)
    return 0 if CountingExporter.failed == 0 and CountingExporter.exported == count else 1


if __name__ == "__main__":
    sys.exit(main())
