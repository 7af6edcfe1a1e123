"""Alert rules on synthetic histories, the webhook against a real HTTP server, actions and redaction."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from _records import record_of

from memwatch import AlertConfig, MonitorConfig
from memwatch.alerts import AlertEngine, WebhookSink
from memwatch.config import ConfigError
from memwatch.engine.extraction import ExtractionResult
from memwatch.record import ProbeTracker
from memwatch.store.history import HistoryStore

M = 4


class Sim:
    """A synthetic run: groups and metas fixed, each evaluation given as exact flags / match ratios / exposure."""

    def __init__(self, groups, metas=None, suffixes=None):
        self.groups = np.array(groups, dtype=object)
        self.metas = metas or [{} for _ in groups]
        self.ids = [f"p{i}" for i in range(len(groups))]
        self.tracker = ProbeTracker(len(groups))
        self.step = 0
        n = len(groups)
        # The panel's windows [N, 4 + M]: by default every suffix has M distinct tokens (real text, not a run).
        self.tokens = np.zeros((n, 4 + M), np.int64)
        self.tokens[:, 4:] = np.arange(M) if suffixes is None else np.asarray(suffixes)

    def record(self, exact, ratio=None, exposure=None, near_tie=None, exposure_rank=None):
        exact = np.asarray(exact, dtype=bool)
        n = len(exact)
        ratio = np.where(exact, 1.0, 0.0 if ratio is None else ratio).astype(np.float32)
        res = ExtractionResult(
            prefix_len=4,
            suffix_len=M,
            entropy_window=2,
            mode="full",
            generated=np.zeros((n, M), np.int64),
            exact=exact,
            match_ratio=ratio,
            match_count=np.rint(ratio * M).astype(np.int64),
            prefix_match_len=(ratio * M).astype(np.int64),
            edit_similarity=ratio,
            entropy=np.ones((n, 2 + M), np.float32),
            suffix_nll=np.ones(n, np.float32),
            near_tie=np.zeros(n, bool) if near_tie is None else np.asarray(near_tie, dtype=bool),
        )
        self.step += 10
        extra = None if exposure is None else {"exposure": np.asarray(exposure, dtype=float)}
        if exposure_rank is not None:
            extra = {**(extra or {}), "exposure_rank": np.asarray(exposure_rank, dtype=float)}
        return record_of(
            res,
            self.groups,
            step=self.step,
            tracker=self.tracker,
            metas=self.metas,
            extra=extra,
            tokens=self.tokens,
        )


def run(engine, sim, evaluations):
    """Feed evaluations; return the list of rules fired at each one."""
    return [[a.rule for a in engine.evaluate(sim.record(**e))] for e in evaluations]


def test_canary_extracted_fires_once_and_respects_cooldown():
    groups = ["canary", "canary", "train"]
    metas = [
        {"canary_id": "cn-a", "repetitions": 64, "family": "digits"},
        {"canary_id": "cn-b", "repetitions": 1},
        {},
    ]
    only = AlertConfig(extraction_rate={}, spike=False, leak=False, exposure_bits=None, cooldown=3)
    engine = AlertEngine(only)
    sim = Sim(groups, metas)
    seq = [[0, 0, 1], [0, 0, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1], [1, 0, 1]]
    fired = []
    for exact in seq:
        alerts = engine.evaluate(sim.record(exact=exact))
        fired.append(alerts)
    assert [len(a) for a in fired] == [
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        1,
    ]  # eval 6 re-extracted within cooldown: quiet
    first = fired[2][0]
    assert first.rule == "canary_extracted" and first.probe_ids == ["p0"] and first.group == "canary"
    assert (
        "p0 (canary cn-a, 64x, digits)" in first.message and first.step == 30 and first.data["tiers"] == [64]
    )
    no_cooldown = AlertEngine(
        AlertConfig(extraction_rate={}, spike=False, leak=False, exposure_bits=None, cooldown=0)
    )
    assert [len(x) for x in run(no_cooldown, Sim(groups, metas), [{"exact": e} for e in seq])] == [
        0,
        0,
        1,
        0,
        0,
        1,
        0,
        0,
        1,
    ]


def test_leak_rule_ignores_the_baseline_and_catches_heldout_and_twins():
    engine = AlertEngine(
        AlertConfig(extraction_rate={}, spike=False, canary_extracted=False, exposure_bits=None)
    )
    sim = Sim(
        ["heldout", "heldout", "canary_heldout", "train"],
        [{}, {}, {"canary_id": "cn-t", "repetitions": 4}, {}],
    )
    assert run(engine, sim, [{"exact": [1, 0, 0, 1]}, {"exact": [1, 0, 0, 1]}]) == [
        [],
        [],
    ]  # known before training
    alerts = engine.evaluate(sim.record(exact=[1, 1, 1, 1]))
    assert [(a.rule, a.group, a.probe_ids) for a in alerts] == [
        ("leak", "heldout", ["p1"]),
        ("leak", "canary_heldout", ["p2"]),
    ]
    assert "never-inserted twin" in alerts[1].message and "measurement fault" in alerts[0].message


def test_a_predictable_suffix_is_not_a_leak():
    cfg = AlertConfig(extraction_rate={}, spike=False, canary_extracted=False, exposure_bits=None)
    # p0's suffix is a run of one token (indentation), p1's has 2 distinct tokens, p2's a real sentence
    engine = AlertEngine(cfg)
    sim = Sim(["heldout"] * 3, [{}, {}, {}], suffixes=[[7, 7, 7, 7], [7, 8, 7, 8], [1, 2, 3, 4]])
    assert run(engine, sim, [{"exact": [0, 0, 0]}]) == [[]]
    (alert,) = engine.evaluate(sim.record(exact=[1, 1, 1]))
    assert alert.probe_ids == ["p2"]
    with pytest.raises(ConfigError, match="leak_min_distinct must be an integer >= 0"):
        AlertConfig(leak_min_distinct=-1)


def _train_rate_rule(cooldown: int) -> tuple[AlertEngine, Sim]:
    """The extraction-rate rule alone on 10 train probes: threshold 0.5, re-armed below 0.4."""
    only = AlertConfig(
        extraction_rate={"train": 0.5},
        spike=False,
        leak=False,
        canary_extracted=False,
        exposure_bits=None,
        cooldown=cooldown,
        hysteresis=0.2,
    )
    return AlertEngine(only), Sim(["train"] * 10)


def test_extraction_rate_threshold_with_hysteresis():
    engine, sim = _train_rate_rule(cooldown=0)
    rates = [0.3, 0.5, 0.6, 0.45, 0.6, 0.3, 0.7]  # re-arms below 0.4 only
    fired = run(engine, sim, [{"exact": [i < int(r * 10) for i in range(10)]} for r in rates])
    assert fired == [[], ["extraction_rate"], [], [], [], [], ["extraction_rate"]]


def test_spike_needs_a_baseline_and_a_real_jump():
    cfg = AlertConfig(
        extraction_rate={},
        leak=False,
        canary_extracted=False,
        exposure_bits=None,
        spike_min_evals=4,
        spike_min_rate=0.05,
        spike_min_count=3,
        cooldown=1,
    )
    engine = AlertEngine(cfg)
    sim = Sim(["train"] * 100)
    base = [0.10, 0.11, 0.10, 0.12]
    fired = run(engine, sim, [{"exact": [i < int(r * 100) for i in range(100)]} for r in [*base, 0.13, 0.40]])
    assert fired[:5] == [[], [], [], [], []]  # too early, then too small a jump
    assert "spike" in fired[5]
    alert = [a for a in engine.evaluate(sim.record(exact=[i < 90 for i in range(100)])) if a.rule == "spike"]
    assert alert == []  # cooldown of 1 evaluation holds
    early = AlertEngine(cfg)
    assert run(early, Sim(["train"] * 100), [{"exact": [i < r for i in range(100)]} for r in (5, 60)]) == [
        [],
        [],
    ]


def test_spike_in_newly_memorized_counts():
    cfg = AlertConfig(
        extraction_rate={},
        leak=False,
        canary_extracted=False,
        exposure_bits=None,
        spike_min_evals=3,
        spike_min_rate=1.0,
        spike_min_count=5,
    )
    engine = AlertEngine(cfg)
    sim = Sim(["train"] * 60)
    exact = np.zeros(60, bool)
    fired = []
    for n_new in (1, 1, 2, 1, 20):
        start = int(exact.sum())
        exact[start : start + n_new] = True
        alerts = engine.evaluate(sim.record(exact=exact.copy()))
        fired.append([a.data.get("metric") for a in alerts])
    assert fired[:4] == [[], [], [], []] and fired[4] == ["newly_memorized"]


def test_exposure_early_warning_with_hysteresis():
    cfg = AlertConfig(
        extraction_rate={},
        spike=False,
        leak=False,
        canary_extracted=False,
        exposure_bits=8.0,
        cooldown=0,
        hysteresis=0.2,
    )
    engine = AlertEngine(cfg)
    sim = Sim(["canary", "canary_heldout"], [{"canary_id": "cn-x", "repetitions": 16}, {"canary_id": "cn-y"}])
    values = [5, 9, 9.5, 7, 9, 5, 9]  # re-arms below 6.4
    fired = run(engine, sim, [{"exact": [0, 0], "exposure": [v, 20]} for v in values])
    assert fired == [[], ["exposure"], [], [], [], [], ["exposure"]]  # the twin's exposure never alerts


def test_the_exposure_alert_never_fires_at_the_baseline_on_extrapolation_alone():
    """At the step-0 baseline only exposure by rank counts (capped at log2 R): a skew-normal tail past what 32
    references resolve cannot fire before training did anything; from the next evaluation on it can."""
    cfg = AlertConfig(extraction_rate={}, spike=False, leak=False, canary_extracted=False, exposure_bits=8.0)
    sim = Sim(["canary"], [{"canary_id": "cn-x", "repetitions": 16}])
    fired = run(AlertEngine(cfg), sim, [{"exact": [0], "exposure": [20], "exposure_rank": [5]}] * 2)
    assert fired == [[], ["exposure"]]
    # With enough references the rank itself reaches the threshold: then the baseline does fire.
    sim = Sim(["canary"], [{"canary_id": "cn-x", "repetitions": 16}])
    assert run(AlertEngine(cfg), sim, [{"exact": [0], "exposure": [9], "exposure_rank": [9]}]) == [
        ["exposure"]
    ]


def test_an_exposure_threshold_past_what_the_references_resolve_is_warned_at_setup(tmp_path, caplog):
    from _models import tiny_model

    from memwatch import Monitor, MonitorConfig
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    man = make_canaries(ByteTokenizer(), tiers=(2,), per_tier=1, prefix_len=8, secret_len=8, references=32)
    rows = [{"input_ids": list(range(i, i + 24))} for i in range(1, 40)]
    data, man = inject(rows, man)
    cfg = MonitorConfig(
        prefix_len=8, suffix_len=8, exposure_references=32, console=False, tensorboard=False, history=False,
        reference=None, embedding_every=None, train_probes=0, heldout_probes=0,
    )  # fmt: skip
    monitor = Monitor(cfg, canaries=man)
    with caplog.at_level("WARNING", logger="memwatch"):
        monitor.setup(tiny_model("gpt2"), output_dir=tmp_path, train_data=data)
    monitor.close()
    assert (
        "exposure_bits=8 exceeds what 32 reference secrets resolve by rank (log2 32 = 5.0 bits)"
        in caplog.text
    )
    assert "exposure_references to 256 or more" in caplog.text


def test_disabled_and_actions():
    sim = Sim(["canary"], [{"canary_id": "cn-a", "repetitions": 1}])
    assert AlertEngine(AlertConfig(enabled=False)).evaluate(sim.record(exact=[1])) == []
    engine = AlertEngine(AlertConfig(actions={"canary_extracted": ("save_checkpoint", "stop_training")}))
    (alert,) = [
        a
        for a in engine.evaluate(Sim(["canary"], [{"canary_id": "c"}]).record(exact=[1]))
        if a.rule == "canary_extracted"
    ]
    assert alert.action == "save_checkpoint,stop_training"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extraction_rate": {"train": 2}}, "extraction_rate must map group names to rates"),
        ({"actions": {"canary": ("stop_training",)}}, "unknown rule 'canary'"),
        ({"actions": {"spike": "stop_training"}}, "must be a tuple of"),
        ({"webhook_url": "ftp://x"}, "http:// or https:// URL"),
        ({"webhook_url": "http://"}, "a URL with a host name"),
        ({"webhook_url": "https://hooks.example/T0 /SECRET"}, "without spaces"),
        ({"webhook_timeout": 0}, r"webhook_timeout must be seconds in \(0, 300\]"),
        ({"webhook_timeout": float("inf")}, "webhook_timeout must be seconds"),
        ({"webhook_retries": 10**9}, "webhook_retries must be at most 10"),
        ({"spike_z": float("nan")}, "spike_z must be a finite number"),
        ({"exposure_bits": float("nan")}, "positive number of bits or None"),
        ({"hysteresis": 1.5}, "hysteresis must be below 1"),
        ({"exposure_bits": 0}, "positive number of bits or None"),
        ({"on_alert": 3}, "must be callable"),
        ({"cooldown": -1}, "integer >= 0"),
    ],
)
def test_alert_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        AlertConfig(**kwargs)
    assert "SECRET" not in str(err.value)  # a rejected webhook URL is never echoed (its path is a token)
    with pytest.raises(ConfigError, match=r"memwatch\.AlertConfig"):
        MonitorConfig(alerts={"enabled": True})


def test_webhook_url_is_never_stored(tmp_path):
    """Checked in what a real run writes (the history file with its WAL, the JSONL alerts), not only in the config."""
    from _models import memorizing_panel, trained_model

    from memwatch import Monitor

    server = _Server()
    try:
        url = server.url + "/T000/SECRET-TOKEN"
        cfg = MonitorConfig(
            prefix_len=16,
            suffix_len=16,
            entropy_window=8,
            console=False,
            tensorboard=False,
            alerts=AlertConfig(webhook_url=url),
        )
        assert "SECRET" not in json.dumps(cfg.to_dict())
        train, _ = memorizing_panel(16, 16)
        monitor = Monitor(cfg)
        model = trained_model("gpt2", 16, 16)
        monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
        written = [tmp_path / "memwatch" / name for name in ("history.sqlite", "history.sqlite-wal")]
        assert monitor.evaluate(model, 0).alerts
        files = [p.read_bytes() for p in [*written, tmp_path / "memwatch" / "alerts.jsonl"] if p.exists()]
        monitor.close()
        files.append(written[0].read_bytes())
        assert len(server.bodies) == 1  # the hook was used
        assert not any(b"SECRET-TOKEN" in data for data in files)
    finally:
        server.close()


# --- webhook against a real HTTP server -----------------------------------------------------------------------


class _Server:
    """A real HTTP server on 127.0.0.1 that records POSTed JSON; `hang` seconds of silence before answering,
    or `hold(body)`, called in the handler's thread, returning when the answer may be sent."""

    def __init__(self, hang: float = 0.0, hold=None):
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append({"json": json.loads(body), "content_type": self.headers["Content-Type"]})
                if hang:
                    time.sleep(hang)
                if hold is not None:
                    hold(body)
                try:
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting, as it should

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_webhook_posts_slack_style_json():
    from memwatch.alerts import Alert

    server = _Server()
    try:
        sink = WebhookSink(server.url, timeout=2, retries=0, run_name="r1")
        sink(
            Alert(120, "canary_extracted", "canary", ["p0"], "step 120: 1 inserted canary became extractable")
        )
        sink.close(5)
        assert sink.sent == 1 and sink.failures == 0
        (got,) = server.bodies
        assert got["content_type"] == "application/json"
        body = got["json"]
        assert body["text"].startswith("memwatch: step 120") and body["run"] == "r1"
        assert body["alert"]["rule"] == "canary_extracted" and body["alert"]["probe_ids"] == ["p0"]
    finally:
        server.close()


def test_emitting_returns_while_the_server_still_holds_the_request():
    from memwatch.alerts import Alert

    release = threading.Event()
    server = _Server(hold=lambda body: release.wait(60))
    try:
        sink = WebhookSink(server.url, timeout=60, retries=0)
        sink(Alert(1, "spike", "train", [], "m"))  # returns at once: the POST is in flight, unanswered
        deadline = time.monotonic() + 30
        while not server.bodies and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.bodies and not release.is_set() and sink.sent == 0  # the caller went on meanwhile
        release.set()
        sink.close(grace=30)
        assert sink.sent == 1 and sink.failures == 0
    finally:
        release.set()
        server.close()


def test_a_webhook_that_never_answers_is_given_up_after_bounded_attempts():
    from memwatch.alerts import Alert

    server = _Server(hang=30)
    try:
        sink = WebhookSink(server.url, timeout=0.3, retries=1)
        sink(Alert(1, "spike", "train", [], "m"))
        sink.close(grace=10)  # two attempts of 0.3 s and a short back-off fit well inside the grace
        assert sink.failures == 1 and sink.sent == 0 and len(server.bodies) == 2
        assert not any(t.is_alive() for t in sink.threads)
    finally:
        server.close()


def test_a_crossing_held_back_by_the_cooldown_fires_when_it_ends():
    engine, sim = _train_rate_rule(cooldown=2)
    rates = [
        0.6,
        0.2,
        0.7,
        0.7,
        0.7,
    ]  # fires, re-arms, crosses again inside the cooldown, still above after it
    fired = run(engine, sim, [{"exact": [i < int(r * 10) for i in range(10)]} for r in rates])
    assert fired == [["extraction_rate"], [], [], ["extraction_rate"], []]


def test_failed_webhooks_never_log_the_url_path(caplog):
    from memwatch.alerts import Alert

    sink = WebhookSink("http://127.0.0.1:9/services/T000/B000/SECRET", timeout=0.2, retries=0)
    with caplog.at_level("WARNING", logger="memwatch"):
        sink(Alert(1, "spike", "train", [], "m"))
        sink.close(3)
    assert sink.failures == 1 and "127.0.0.1:9" in caplog.text and "SECRET" not in caplog.text


def test_console_alerts_show_brackets_as_text():
    import io

    from rich.console import Console

    from memwatch.alerts import Alert
    from memwatch.reporters.console import ConsoleReporter

    out = io.StringIO()
    reporter = ConsoleReporter(Console(file=out, width=200, color_system=None))
    reporter.alert(Alert(3, "leak", "heldout", ["p"], "step 3: p0 [prefix 'a[/]b', suffix 'c']"))
    reporter.warn("writing [the history] failed")
    assert "[prefix 'a[/]b', suffix 'c']" in out.getvalue() and "[the history]" in out.getvalue()


def test_the_console_table_starts_on_its_own_line_beside_a_progress_bar_in_a_log():
    """A log file (not a terminal) that the Trainer's tqdm bar and memwatch's console share: the bar's line has no
    newline of its own, so the table must end it before printing; without a live bar nothing is added."""
    import io

    from rich.console import Console
    from tqdm import tqdm

    from memwatch.reporters.console import ConsoleReporter

    sim = Sim(["train", "train"])
    log = io.StringIO()
    reporter = ConsoleReporter(Console(file=log, width=120, color_system=None, force_terminal=False))
    bar = tqdm(total=10, file=log, ascii=True)
    bar.update(3)
    bar.refresh()  # drawn now, as a bar is between two evaluations
    reporter.write(sim.record(exact=[1, 0]))
    bar.close()
    lines = log.getvalue().replace("\r", "\n").split("\n")
    header = next(i for i, line in enumerate(lines) if "memwatch · step" in line)  # the table's title
    assert "3/10" not in lines[header] and any("3/10" in line for line in lines[:header])
    alone = io.StringIO()
    ConsoleReporter(Console(file=alone, width=120, color_system=None)).write(sim.record(exact=[1, 0]))
    assert not alone.getvalue().startswith("\n")


@pytest.mark.monitor_failures
def test_posts_in_flight_at_shutdown_are_counted_and_reported(tmp_path, caplog):
    """A server that never answers: at the end the posts still in flight are abandoned, and the run says so (sent,
    failed, abandoned), in the log and in the monitor's end-of-run summary."""
    from _models import memorizing_panel, trained_model

    from memwatch import Monitor

    release = threading.Event()
    server = _Server(hold=lambda body: release.wait(120))
    try:
        train, _ = memorizing_panel(16, 16)
        cfg = MonitorConfig(
            prefix_len=16,
            suffix_len=16,
            entropy_window=8,
            console=False,
            tensorboard=False,
            alerts=AlertConfig(webhook_url=server.url, webhook_timeout=60, webhook_retries=0),
        )
        monitor = Monitor(cfg)
        model = trained_model("gpt2", 16, 16)
        monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in train])
        record = monitor.evaluate(model, 0)
        assert record.alerts  # every train window is extracted: the extraction-rate alert fires
        with caplog.at_level("INFO", logger="memwatch"):
            monitor.close()  # waits min(10, 60 + 1) s at most
        n = len(record.alerts)
        assert f"0 alert(s) sent, 0 failed, {n} abandoned at shutdown" in caplog.text
        assert f"alerts not delivered to webhook: {n}" in monitor.failures[-1]
        with HistoryStore(tmp_path / "memwatch" / "history.sqlite", readonly=True) as h:
            assert any(a["rule"] == "monitor_losses" and "webhook" in a["message"] for a in h.alerts())
    finally:
        release.set()
        server.close()


# --- rules over any statistic, your own rules, near ties ----------------------------------------------------------

_ONLY_NEW = {
    "extraction_rate": {},
    "spike": False,
    "leak": False,
    "canary_extracted": False,
    "exposure_bits": None,
}


def test_a_threshold_on_any_statistic_by_key_or_pattern():
    engine = AlertEngine(
        AlertConfig(**_ONLY_NEW, thresholds={"train/mean_match_ratio": 0.5, "*/memorized_rate": 0.3})
    )
    sim = Sim(["train"] * 2 + ["heldout"] * 2)
    fired = [
        engine.evaluate(sim.record(exact=e, ratio=r))
        for e, r in (
            ([0, 0, 0, 0], [0.25, 0.25, 0, 0]),  # mean match ratio of train 0.25
            ([0, 0, 0, 0], [0.75, 0.5, 0, 0]),  # 0.625: crosses 0.5
            (
                [1, 0, 1, 0],
                [1.0, 0.0, 1.0, 0],
            ),  # memorized rate 0.5 in both groups: the pattern fires for each
        )
    ]
    assert [[(a.rule, a.group) for a in f] for f in fired] == [
        [],
        [("threshold", "train")],
        [("threshold", "train"), ("threshold", "heldout")],
    ]
    assert (
        fired[1][0].data["key"] == "train/mean_match_ratio"
        and "crossed the threshold 0.5" in fired[1][0].message
    )
    with pytest.raises(ConfigError, match="thresholds must map statistic keys"):
        AlertConfig(thresholds={"extraction_rate": 0.1})


def test_a_pattern_s_wildcard_stays_within_one_segment():
    """*/extraction_rate is every group's, not a canary tier's (canaries/64x/extraction_rate): the default spike
    rule watches groups as it always did; canaries/*/extraction_rate names the tiers."""
    sim = Sim(
        ["canary", "canary", "train"],
        [{"canary_id": "cn-a", "repetitions": 64}, {"canary_id": "cn-b", "repetitions": 1}, {}],
    )
    record = sim.record(exact=[1, 0, 0])
    assert {"canary/extraction_rate", "canaries/64x/extraction_rate"} <= set(record.scalars)
    groups = AlertEngine(AlertConfig(**_ONLY_NEW, thresholds={"*/extraction_rate": 0.4}))
    assert [a.group for a in groups.evaluate(record)] == ["canary"]
    tiers = AlertEngine(AlertConfig(**_ONLY_NEW, thresholds={"canaries/*/extraction_rate": 0.4}))
    assert [a.group for a in tiers.evaluate(sim.record(exact=[1, 0, 0]))] == ["canaries/64x"]


def test_your_own_rule_and_its_action():
    class TwoExtracted:
        name = "two_extracted"

        def check(self, record, state, ctx):
            n = int(np.asarray(record.values["exact"]).sum())
            return (
                [Alert(record.step, self.name, None, [], f"{n} extracted", ctx.action(self.name))]
                if n >= 2
                else []
            )

    from memwatch.alerts import Alert

    cfg = AlertConfig(**_ONLY_NEW, rules=(TwoExtracted(),), actions={"two_extracted": ("stop_training",)})
    engine, sim = AlertEngine(cfg), Sim(["train"] * 3)
    assert engine.evaluate(sim.record(exact=[1, 0, 0])) == []
    (alert,) = engine.evaluate(sim.record(exact=[1, 1, 0]))
    assert alert.rule == "two_extracted" and alert.action == "stop_training"
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        AlertConfig(actions={"nope": ("stop_training",)})


def test_a_flip_on_a_near_tie_waits_for_confirmation():
    metas = [{"canary_id": "c0", "repetitions": 4}, {"canary_id": "c1", "repetitions": 4}]
    only_canary = {**_ONLY_NEW, "canary_extracted": True}
    engine, sim = AlertEngine(AlertConfig(**only_canary)), Sim(["canary", "canary"], metas)
    assert engine.evaluate(sim.record(exact=[0, 0])) == []
    # Both canaries extracted, c0 on a near-tie row: c1 fires now, c0 waits.
    (now,) = engine.evaluate(sim.record(exact=[1, 1], near_tie=[True, False]))
    assert now.probe_ids == ["p1"]
    # c0 still extracted at the next evaluation: confirmed, and said so.
    (later,) = engine.evaluate(sim.record(exact=[1, 1]))
    assert later.probe_ids == ["p0"] and "confirmed" in later.message
    assert later.data["uncertain_confirmed"] == ["p0"]
    # A near-tie flip that does not hold is never announced.
    engine, sim = AlertEngine(AlertConfig(**only_canary)), Sim(["canary", "canary"], metas)
    engine.evaluate(sim.record(exact=[0, 0]))
    assert engine.evaluate(sim.record(exact=[1, 0], near_tie=[True, False])) == []
    assert engine.evaluate(sim.record(exact=[0, 0])) == []
    # Switched off: a near tie fires at once.
    engine, sim = AlertEngine(AlertConfig(**only_canary, confirm_near_ties=False)), Sim(["canary"] * 2, metas)
    engine.evaluate(sim.record(exact=[0, 0]))
    assert [a.probe_ids for a in engine.evaluate(sim.record(exact=[1, 0], near_tie=[True, False]))] == [
        ["p0"]
    ]


def test_events_on_near_tie_rows_are_marked_uncertain():
    sim = Sim(["train"] * 3)
    sim.record(exact=[0, 0, 1])
    record = sim.record(exact=[1, 1, 0], near_tie=[True, False, True])
    assert record.values["uncertain_event"].tolist() == [True, False, True]  # newly, newly (sure), forgotten
    assert record.scalars["train/uncertain_events"] == 2
