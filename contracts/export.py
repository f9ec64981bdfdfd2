"""Export the JSON Schema of every message and an AsyncAPI 3.0 document of the system.

python -m contracts.export          # write contracts/schema/
python -m contracts.export --check  # exit 1 when the committed files are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from contracts.catalog import CHANNELS, FLEET_SERVICES, STREAMS, durable_name

SCHEMA_DIR = Path(__file__).parent / "schema"


def message_schemas() -> dict[str, dict[str, Any]]:
    return {c.subject: c.event.model_json_schema(mode="validation") for c in CHANNELS}


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for c in CHANNELS:
        key = c.subject.replace(".", "_")
        name = c.event.__name__
        messages[name] = {
            "name": name,
            "title": name,
            "summary": (c.event.__doc__ or name).strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    "Nats-Msg-Id": {"type": "string", "description": "= event_id; dedupe key"},
                    "traceparent": {"type": "string", "description": "W3C trace context"},
                },
            },
            "payload": {"$ref": f"./{c.subject}.json"},
        }
        channels[key] = {
            "address": c.subject,
            "description": (
                f"JetStream stream {c.stream.name}" if c.stream else "Core NATS, not stored"
            ),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        for producer in c.producers:
            operations[f"{producer}_sends_{key}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{key}"},
                "summary": f"{producer} publishes {c.subject}",
            }
        for consumer in c.consumers:
            durable = consumer in FLEET_SERVICES and c.stream is not None
            how = f" (durable consumer {durable_name(consumer, c.subject)})" if durable else ""
            operations[f"{consumer}_receives_{key}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{key}"},
                "summary": f"{consumer} consumes {c.subject}{how}",
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "LLM Fleet events",
            "version": "1.0.0",
            "description": "Every event of LLM Fleet. Streams: "
            + "; ".join(f"{s.name} ({', '.join(s.subjects)})" for s in STREAMS),
        },
        "defaultContentType": "application/json",
        "servers": {"nats": {"host": "localhost:4222", "protocol": "nats"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def documents() -> dict[str, str]:
    docs = {f"{subject}.json": schema for subject, schema in message_schemas().items()}
    docs["asyncapi.json"] = asyncapi()
    return {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in docs.items()}


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    wanted = documents()
    present = {p.name for p in directory.glob("*.json")} if directory.exists() else set()
    stale = [
        n
        for n, text in wanted.items()
        if not (directory / n).exists() or (directory / n).read_text() != text
    ]
    return sorted(stale + sorted(present - wanted.keys()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail when the export is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale schema files (run: python -m contracts.export): " + ", ".join(stale))
            return 1
        print(f"{len(documents())} schema files up to date")
        return 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for old in SCHEMA_DIR.glob("*.json"):
        old.unlink()
    for name, text in documents().items():
        (SCHEMA_DIR / name).write_text(text)
    print(f"wrote {len(documents())} files to {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
