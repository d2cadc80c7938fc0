"""CloudEvents conformance of a running Shoal agent, checked with the CNCF
CloudEvents Python SDK (`cloudevents` 2.x from PyPI).

Run by agent/tests/cloudevents_sdk.rs:
    python3 cloudevents_sdk.py AGENT_URL APP_PORT

Events made by the SDK (`to_binary`, `to_structured`) are published in both
modes; each comes back by pull (the JSON events parsed by the SDK) and by push
(a receiver on APP_PORT whose requests are parsed by the SDK's `from_http`),
and every attribute, extension type and the data are compared with what was
sent. Invalid events must be refused with 400 `invalid_event` naming the
attribute. Prints one line per failed check and exits 1 if any failed; on
success the last line is `PASS <n> checks`.

`cloudevents.core` (the 2.x API) follows the HTTP binding's percent-encoding
(3.1.3.2) and is used for every case. The classic API (`cloudevents.v1.http`,
or `cloudevents.http` in 1.x) neither percent-encodes nor decodes header
values, so its binary-mode events only carry values that need no encoding;
it also publishes structured events and parses every pulled event.
"""

import base64
import http.server
import json
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from urllib.parse import unquote

from cloudevents.core.bindings import http as core_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as CoreEvent

try:
    from cloudevents.v1 import http as classic
except ImportError:  # cloudevents 1.x
    from cloudevents import http as classic

AGENT = sys.argv[1].rstrip("/")
APP_PORT = int(sys.argv[2])
TOPIC = "cesdk"
RUN = str(int(time.time() * 1000))

failures = []
passed = 0


def check(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
        print("FAIL", what, flush=True)


def request(method, path, body=None, headers=None):
    req = urllib.request.Request(
        AGENT + path, data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --- push receiver ---------------------------------------------------------

pushes = queue.Queue()


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n)
        headers = {k.lower(): v for k, v in self.headers.items()}
        pushes.put((headers, body))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", APP_PORT), Receiver)
threading.Thread(target=server.serve_forever, daemon=True).start()

# --- subscriptions -----------------------------------------------------------

for name, spec in [
    ("cesdkpull", {"topic": TOPIC, "group": "cesdkpull", "start": "earliest"}),
    (
        "cesdkpush",
        {"topic": TOPIC, "group": "cesdkpush", "start": "earliest", "pushPath": "/ce"},
    ),
]:
    status, _, body = request(
        "PUT",
        f"/v1/subscriptions/{name}",
        json.dumps(spec).encode(),
        {"content-type": "application/json"},
    )
    if status not in (200, 201):
        print(f"declaring {name}: {status} {body!r}")
        sys.exit(1)

# --- the events --------------------------------------------------------------

SOURCE = "/shop%20eu/caf%C3%A9"  # a URI-reference with escapes: % in a header
CASES = {
    "text": (
        {"subject": "order 7 café", "pct": "a%41b", "quote": 'say "hi" ~'},
        "hello wörld 100%",
        "text/plain; charset=utf-8",
    ),
    "typed": (
        {"count": 42, "flag": True, "off": False, "partitionkey": "cust é"},
        {"n": 1, "s": "ü"},
        "application/json",
    ),
    "nodata": ({"subject": "nothing"}, None, None),
    "bytes": ({"subject": "bin"}, b"\x00\xff\x10%", "application/octet-stream"),
}
# The classic API does not percent-encode: binary mode only with safe values.
CLASSIC_SAFE = {
    "text": ({"subject": "order-7", "tenant": "acme"}, "hello", "text/plain"),
    "typed": ({"count": 42, "flag": True}, {"n": 2}, "application/json"),
}

sent = {}  # id -> (api, mode, case, attributes, data)


def attributes(api, mode, case, extra, ct):
    a = {
        "specversion": "1.0",
        "id": f"{RUN}-{api}-{mode}-{case}",
        "source": SOURCE,
        "type": "com.example.sdk",
        "time": datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=timezone.utc),
    }
    a.update(extra)
    if ct:
        a["datacontenttype"] = ct
    return a


def publish(headers, body, what):
    status, _, answer = request("POST", f"/v1/topics/{TOPIC}/messages", body, headers)
    check(status == 201, f"{what}: publish answered {status} {answer[:300]!r}")


for mode in ["binary", "structured"]:
    for case, (extra, data, ct) in CASES.items():
        a = attributes("core", mode, case, extra, ct)
        event = CoreEvent(dict(a), data)
        msg = (core_http.to_binary if mode == "binary" else core_http.to_structured)(
            event, JSONFormat()
        )
        sent[a["id"]] = ("core", mode, case, a, data, msg.headers)
        publish(msg.headers, msg.body, a["id"])
    for case, (extra, data, ct) in (CLASSIC_SAFE if mode == "binary" else CASES).items():
        a = attributes("classic", mode, case, extra, ct)
        if mode == "binary":
            a["source"] = "/shop/eu"  # no % here: the classic API sends it as it is
        a["time"] = a["time"].isoformat().replace("+00:00", "Z")
        event = classic.CloudEvent(dict(a), data)
        if mode == "binary":
            # The classic API's default marshaller writes JSON even for text.
            headers, body = classic.to_binary(
                event,
                data_marshaller=lambda d: d.encode() if isinstance(d, str) else json.dumps(d).encode(),
            )
        else:
            headers, body = classic.to_structured(event)
        sent[a["id"]] = ("classic", mode, case, a, data, headers)
        publish(headers, body, a["id"])

# --- what must come back -----------------------------------------------------


def canonical_text(v):
    """An attribute value as the binding's string encoding."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime):
        return v.isoformat().replace("+00:00", "Z")
    return str(v)


def expected_value(name, value, api, mode, pub_headers, delivered_as):
    """What attribute `name` reads as after the round trip."""
    if mode == "binary" and name not in ("datacontenttype",):
        # Binary mode carries text: what the SDK wrote into the header.
        # (The classic API leaves non-string values in its header dict.)
        text = str(pub_headers.get(f"ce-{name}", ""))
        return unquote(text) if api == "core" else text
    if delivered_as == "push" and not isinstance(value, str):
        return canonical_text(value)
    return value


def as_time(v):
    if isinstance(v, datetime):
        return v
    return datetime.fromisoformat(str(v).replace("Z", "+00:00"))


def compare(event_id, attrs, data, how):
    api, mode, case, a, want_data, pub_headers = sent[event_id]
    where = f"{event_id} via {how}"
    delivered_as = "push" if how.startswith("push") else "pull"
    for name, value in a.items():
        got = attrs.get(name)
        if name == "time":
            check(got is not None and as_time(got) == as_time(value), f"{where}: time {got!r} != {value!r}")
            continue
        want = expected_value(name, value, api, mode, pub_headers, delivered_as)
        if name == "datacontenttype":
            want = value
        check(
            got == want and type(got) is type(want),
            f"{where}: {name} {got!r} ({type(got).__name__}) != {want!r} ({type(want).__name__})",
        )
    if how == "push (classic)" and isinstance(data, bytes) and isinstance(want_data, str):
        data = data.decode()  # the classic API hands non-JSON binary-mode data over as bytes
    if want_data is None:
        check(data is None, f"{where}: no data sent, got {data!r}")
    elif isinstance(want_data, bytes):
        check(bytes(data or b"") == want_data, f"{where}: data {data!r} != {want_data!r}")
    else:
        check(data == want_data, f"{where}: data {data!r} != {want_data!r}")


# Pull: JSON events, parsed by both SDK APIs.
pulled = {}
deadline = time.time() + 30
while len(pulled) < len(sent) and time.time() < deadline:
    status, headers, body = request("GET", "/v1/subscriptions/cesdkpull/messages?max=100&wait=1s")
    check(status == 200, f"pull answered {status}")
    events = json.loads(body)
    for e in events:
        if e.get("id") in sent:
            pulled[e["id"]] = e
    acks = [e["ackid"] for e in events]
    if acks:
        request(
            "POST",
            "/v1/subscriptions/cesdkpull/acks",
            json.dumps({"ack": acks}).encode(),
            {"content-type": "application/json"},
        )
check(len(pulled) == len(sent), f"pulled {len(pulled)} of {len(sent)} events")

for event_id, raw in pulled.items():
    case = sent[event_id][2]
    if case == "nodata":
        check(
            "data" not in raw and "data_base64" not in raw,
            f"{event_id}: an event without data is pulled without data: {raw}",
        )
    check(isinstance(raw.get("shoalpartition"), int), f"{event_id}: shoalpartition a number")
    check(isinstance(raw.get("shoaloffset"), int), f"{event_id}: shoaloffset a number")
    text = json.dumps(raw).encode()
    core_event = core_http.from_structured(
        core_http.HTTPMessage({"content-type": "application/cloudevents+json"}, text),
        JSONFormat(),
    )
    compare(event_id, core_event.get_attributes(), core_event.get_data(), "pull (core)")
    classic_event = classic.from_http({"content-type": "application/cloudevents+json"}, text)
    compare(
        event_id,
        {k: v for k, v in classic_event.get_attributes().items()},
        classic_event.get_data(),
        "pull (classic)",
    )

# Push: binary-mode requests, parsed by from_http.
pushed = {}
deadline = time.time() + 30
while len(pushed) < len(sent) and time.time() < deadline:
    try:
        headers, body = pushes.get(timeout=1)
    except queue.Empty:
        continue
    event_id = unquote(headers.get("ce-id", ""))
    if event_id in sent:
        pushed[event_id] = (headers, body)
check(len(pushed) == len(sent), f"pushed {len(pushed)} of {len(sent)} events")


def needs_no_encoding(a):
    return all(
        all(0x21 <= ord(c) <= 0x7E and c not in '"%' for c in canonical_text(v))
        for k, v in a.items()
        if k not in ("datacontenttype",)
    )


for event_id, (headers, body) in pushed.items():
    api, mode, case, a, _, _ = sent[event_id]
    for name, value in headers.items():
        if name.startswith("ce-"):
            check(
                all(0x21 <= ord(c) <= 0x7E and c != '"' for c in value),
                f"{event_id}: pushed {name}: {value!r} is percent-encoded printable ASCII",
            )
    if event_id.endswith("-core-binary-text"):
        check(headers.get("ce-subject") == "order%207%20caf%C3%A9", f"pushed ce-subject {headers.get('ce-subject')!r}")
        check(headers.get("ce-pct") == "a%2541b", f"pushed ce-pct {headers.get('ce-pct')!r}")
    if "partitionkey" in a:
        check(headers.get("ce-partitionkey") is not None, f"{event_id}: push carries ce-partitionkey")
    message = core_http.HTTPMessage(headers, body)
    core_event = core_http.from_http(message, JSONFormat())
    compare(event_id, core_event.get_attributes(), core_event.get_data(), "push (core)")
    if needs_no_encoding(a) and case != "bytes":
        classic_event = classic.from_http(headers, body)
        compare(event_id, classic_event.get_attributes(), classic_event.get_data(), "push (classic)")

# --- invalid events are refused, naming the attribute ------------------------


def refused(headers, body, attribute, what):
    status, _, answer = request("POST", f"/v1/topics/{TOPIC}/messages", body, headers)
    try:
        err = json.loads(answer)["error"]
    except (ValueError, KeyError, TypeError):
        err = {}
    check(
        status == 400 and err.get("code") == "invalid_event" and attribute in err.get("message", ""),
        f"{what}: want 400 invalid_event naming {attribute}, got {status} {answer[:300]!r}",
    )


binary = {"content-type": "text/plain", "ce-specversion": "1.0", "ce-id": "bad", "ce-type": "t", "ce-source": "/s"}
refused({**binary, "ce-time": "yesterday"}, b"x", "time", "binary ce-time: yesterday")
refused({**binary, "ce-source": ""}, b"x", "source", "binary empty ce-source")
refused({**binary, "ce-source": "/a%20b"}, b"x", "source", "binary ce-source with a space")
refused({**binary, "ce-specversion": "0.3"}, b"x", "specversion", "binary ce-specversion 0.3")
good = {"specversion": "1.0", "id": "bad", "source": "/s", "type": "t"}
structured = {"content-type": "application/cloudevents+json"}
for patch, attribute in [
    ({"time": "not-a-time"}, "time"),
    ({"source": ""}, "source"),
    ({"source": "/order 7"}, "source"),
    ({"id": ""}, "id"),
    ({"type": ""}, "type"),
    ({"specversion": "0.3"}, "specversion"),
    ({"count": 1.5}, "count"),
    ({"nested": {"a": 1}}, "nested"),
    ({"dataschema": "relative/path"}, "dataschema"),
]:
    refused(structured, json.dumps({**good, **patch}).encode(), attribute, f"structured {patch}")
status, _, answer = request(
    "POST",
    f"/v1/topics/{TOPIC}/messages/batch",
    json.dumps([{**good, "id": f"{RUN}-batch-ok"}, {**good, "time": "not-a-time"}]).encode(),
    {"content-type": "application/cloudevents-batch+json"},
)
results = json.loads(answer).get("results", []) if status == 200 else []
check(
    status == 200
    and len(results) == 2
    and "offset" in results[0]
    and results[1].get("error", {}).get("code") == "invalid_event"
    and "time" in results[1]["error"].get("message", ""),
    f"batch with an invalid time: {status} {answer[:300]!r}",
)

server.shutdown()
if failures:
    print(f"{len(failures)} of {len(failures) + passed} checks failed")
    sys.exit(1)
print(f"PASS {passed} checks")
