"""``onestep serve``: the models behind the page, the HTTP API (streamed Generate, latent walk, throughput, bad input,
concurrent clients), the command line, and the page itself in headless Chromium.

The server runs the shipped teacher beside a tiny DD1 run and a tiny DD2 run distilled from it here (a few seconds
each), in this process on a free port of 127.0.0.1.
"""
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import onestep
from onestep.cli import main
from onestep.paths import assets_dir

TEACHER = assets_dir() / "fashion-mnist" / "teacher"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The shipped teacher, tiny DD1 and MapKD runs and (with Fashion-MNIST installed: stage 0 fine-tunes on it) a tiny
    DD2 run."""
    if not (TEACHER / "final" / "config.json").exists():
        pytest.skip(f"the shipped teacher is not at {TEACHER}")
    root = tmp_path_factory.mktemp("serve")
    main(["dd1", "pairs", "--teacher", str(TEACHER), "--out", str(root / "pairs"), "--preset", "tiny", "--seed", "3"])
    main(["dd1", "train", "--pairs", str(root / "pairs"), "--teacher", str(TEACHER), "--run-dir", str(root / "dd1"),
          "--preset", "tiny"])
    main(["mapkd", "train", "--teacher", str(TEACHER), "--run-dir", str(root / "mapkd"), "--preset", "tiny"])
    out = {"teacher": TEACHER, "dd1": root / "dd1", "mapkd": root / "mapkd", "dd2": None}
    if FASHION.exists():
        from onestep.dd2.adapt import ADAPT_PRESETS, adapt_teacher

        adapt_teacher(root / "adapt", TEACHER, replace(ADAPT_PRESETS["tiny"], steps=2, fit_steps=5, max_items=64))
        main(["dd2", "tune", "--preset", "tiny", "--teacher", str(root / "adapt"), "--run-dir", str(root / "tune")])
        main(["dd2", "train", "--preset", "tiny", "--tune", str(root / "tune"), "--run-dir", str(root / "dd2")])
        out["dd2"] = root / "dd2"
    return out


@pytest.fixture(scope="module")
def server(runs):
    """(base URL, Models): the app on uvicorn in a thread, on a free port of 127.0.0.1."""
    import uvicorn

    from onestep.serve import open_socket
    from onestep.serve.app import build_app
    from onestep.serve.models import Models

    models = Models(runs)
    models.warm_up()
    sock = open_socket("127.0.0.1", 0)
    app = build_app(models, host="127.0.0.1", port=sock.getsockname()[1])
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    models.app = app  # (its counts of abandoned requests)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", models
    srv.should_exit = True
    th.join(10)
    sock.close()


def post(url: str, body, raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def events(url: str, body) -> list[dict]:
    status, data = post(url + "/api/generate", body)
    assert status == 200, data
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def png_decode(url: str) -> torch.Tensor:
    """A data URL of an 8-bit gray PNG without filters (what the server writes) -> uint8 (1, H, W)."""
    import base64

    png = base64.b64decode(url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(png):
        n, tag = struct.unpack(">I4s", png[pos:pos + 8])
        chunk = png[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert (depth, colour) == (8, 0)
        elif tag == b"IDAT":
            idat += chunk
        assert struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + chunk) & 0xFFFFFFFF
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = [raw[y * (w + 1):(y + 1) * (w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return torch.tensor([list(r[1:]) for r in rows], dtype=torch.uint8)[None]


# ---- the hook and the pieces ---------------------------------------------------------------------------------
def test_on_step_hook_sees_the_grid_fill_and_draws_nothing(tiny_gpt):
    from onestep.teacher.sampling import SamplingConfig, sample_tokens

    labels = torch.tensor([1, 2])
    cfg = SamplingConfig(cfg_scale=2.0)
    seen = []
    for use_cache in (True, False):
        seen.clear()
        a = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0), use_cache=use_cache,
                          on_step=lambda k, ids: seen.append((k, ids.clone())))
        b = sample_tokens(tiny_gpt, labels, cfg, torch.Generator().manual_seed(0), use_cache=use_cache)
        assert torch.equal(a, b)
        steps = tiny_gpt.ar_steps()
        assert [k for k, _ in seen] == list(range(len(steps)))
        for k, ids in seen:
            end = steps[k][1]
            assert torch.equal(ids[:, :end], a[:, :end]) and (ids[:, end:] == 0).all()


def test_png_bytes_round_trip():
    from onestep.serve.models import data_url

    img = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8)
    assert torch.equal(png_decode(data_url(img)), img)


def test_default_runs_and_resolve_runs(runs, tmp_path, monkeypatch):
    from onestep.serve.models import default_runs, resolve_runs

    (tmp_path / "fashion-mnist").mkdir()
    monkeypatch.setenv("ONESTEP_ASSETS", str(tmp_path))
    assert default_runs() == {"teacher": None, "dd1": None, "mapkd": None, "dd2": None}
    import shutil

    shutil.copytree(runs["dd1"], tmp_path / "fashion-mnist" / "dd1")
    assert default_runs()["dd1"] == tmp_path / "fashion-mnist" / "dd1"
    got = resolve_runs([str(runs["dd1"])], defaults={"teacher": TEACHER, "dd1": None, "mapkd": None, "dd2": None})
    assert got == {"teacher": TEACHER, "dd1": runs["dd1"], "mapkd": None, "dd2": None}
    with pytest.raises(ValueError, match="both dd1 runs"):
        resolve_runs([str(runs["dd1"]), str(runs["dd1"])], defaults={})
    with pytest.raises(ValueError):
        resolve_runs([str(tmp_path)], defaults={})


# ---- the HTTP API ----------------------------------------------------------------------------------------
def test_generate_streams_the_teacher_and_matches_the_api(server, runs):
    url, models = server
    k = 2
    ev = events(url, {"class": 3, "seed": 11, **({"k": k} if k else {})})
    kinds = [e["type"] for e in ev]
    assert kinds[0] == "start" and kinds[-1] == "done" and "error" not in kinds
    assert ev[0]["class"] == 3 and ev[0]["class_name"] == "Dress" and ev[0]["missing"] == ([] if runs["dd2"] else ["dd2"])
    # the one-step images come first, then the teacher's frames, one per AR step, then its image
    frames = [e for e in ev if e["type"] == "frame"]
    K = models.teacher_steps
    assert [f["step"] for f in frames] == list(range(1, K + 1))
    assert kinds.index("frame") > max(i for i, e in enumerate(ev) if e["type"] == "image" and e["key"] != "teacher")
    imgs = {e["key"]: e for e in ev if e["type"] == "image"}
    assert set(imgs) == {"teacher", "dd1", "mapkd", "mapkd-k"} | ({"dd2"} if runs["dd2"] else set())
    partial = [png_decode(f["image"]) for f in frames]
    assert len({p.numpy().tobytes() for p in partial}) > K // 2  # the picture changes as the tokens arrive
    final = png_decode(imgs["teacher"]["image"])
    assert torch.equal(partial[-1], final) and not torch.equal(partial[K // 2], final)
    # the same images as the Python API for the same run, label and seed
    assert torch.equal(final, onestep.load(TEACHER).sample([3], seed=11)[0])
    assert torch.equal(png_decode(imgs["dd1"]["image"]), onestep.load(runs["dd1"]).sample([3], seed=11)[0])
    mapkd = onestep.load(runs["mapkd"])  # the k-step panel is MapKD's, under its default sampler (Jacobi)
    assert torch.equal(png_decode(imgs["mapkd"]["image"]), mapkd.sample([3], seed=11)[0])
    assert torch.equal(png_decode(imgs["mapkd-k"]["image"]), mapkd.sample([3], steps=1 + k, seed=11)[0])
    assert imgs["mapkd-k"]["steps"] == 1 + k
    if runs["dd2"]:
        dd2 = onestep.load(runs["dd2"])
        assert torch.equal(png_decode(imgs["dd2"]["image"]), dd2.sample([3], seed=11)[0])
    done = ev[-1]
    for key, e in imgs.items():
        assert e["latency_s"] > 0 and done["latency_s"][key] == e["latency_s"]
        assert done["speedup"][key] == pytest.approx(done["latency_s"]["teacher"] / e["latency_s"])


def test_random_class_is_resolved_and_reported(server):
    url, models = server
    start = events(url, {"class": "random", "seed": 0})[0]
    assert 0 <= start["class"] < models.num_classes and start["random_class"] is True
    assert start["class_name"] == models.classes[start["class"]]


def test_walk_interpolates_between_the_seeds_images(server, runs):
    url, models = server
    for key in models.one_step_keys:
        def walk(t):
            status, data = post(url + "/api/walk", {"method": key, "class": 5, "seed_a": 2, "seed_b": 9, "t": t})
            assert status == 200, data
            return png_decode(json.loads(data)["image"])

        gen = onestep.load(runs[key])
        a, b = gen.sample([5], seed=2)[0], gen.sample([5], seed=9)[0]
        assert torch.equal(walk(0), a) and torch.equal(walk(1), b)
        mid = [walk(t) for t in (0.3, 0.5, 0.7)]
        assert any(not torch.equal(m, a) and not torch.equal(m, b) for m in mid)


@pytest.mark.parametrize("path,body,message", [
    ("/api/generate", {"class": 10}, "unknown class 10"),
    ("/api/generate", {"class": "shoe"}, "unknown class"),
    ("/api/generate", {"class": True}, "unknown class"),
    ("/api/generate", {"seed": -1}, "seed -1 is out of range"),
    ("/api/generate", {"seed": 2 ** 31}, "out of range"),
    ("/api/generate", {"seed": 1.5}, "seed must be an integer"),
    ("/api/generate", {"k": 0}, "k"),
    ("/api/generate", {"k": 10 ** 6}, "k"),
    ("/api/generate", {"steps": 3}, "unknown field 'steps'"),
    ("/api/generate", b"{not json", "malformed JSON"),
    ("/api/generate", b"[1, 2]", "expected a JSON object"),
    ("/api/generate", b"[" * 30000, "malformed JSON: nested too deeply"),
    ("/api/walk", b'{"t": ' * 5000 + b"1" + b"}" * 5000, "malformed JSON: nested too deeply"),
    ("/api/generate", b"\xff\xfe{}", "malformed JSON"),
    ("/api/walk", {"method": "teacher", "class": 1, "seed_a": 0, "seed_b": 1, "t": 0.5}, "unknown method"),
    ("/api/walk", {"method": "dd1", "class": "random", "seed_a": 0, "seed_b": 1, "t": 0.5}, "unknown class"),
    ("/api/walk", {"method": "dd1", "class": 1, "seed_a": 0, "seed_b": 1, "t": 1.5}, "t must be a number in [0, 1]"),
    ("/api/walk", {"method": "dd1", "class": 1, "seed_b": 1, "t": 0.5}, "seed_a is required"),
    ("/api/throughput", {"k": -1}, "k"),
])
def test_bad_input_is_400_and_the_server_keeps_serving(server, path, body, message):
    url, _ = server
    status, data = post(url + path, None, raw=body) if isinstance(body, bytes) else post(url + path, body)
    assert status == 400
    assert message in json.loads(data)["error"]
    assert events(url, {"class": 1, "seed": 0})[-1]["type"] == "done"


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("[::1]:{port}", 200), ("LOCALHOST:{port}", 200),
    ("evil.example:{port}", 403), ("127.0.0.1.nip.io:{port}", 403), ("localhost:1", 403), ("127.0.0.1", 403),
    ("10.0.0.7:{port}", 403),
])
def test_a_request_for_another_host_is_refused(server, host, status):
    """DNS rebinding: a page of another site whose name now resolves to 127.0.0.1 sends its own name as Host; only the
    server's own addresses with its port are served."""
    import http.client

    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", "/api/info", skip_host=True)
    conn.putheader("Host", host.format(port=port))
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == status, body
    if status == 403:
        assert "is not this server's address" in json.loads(body)["error"]


def test_the_work_of_an_abandoned_generate_request_is_cancelled(server, monkeypatch):
    """Clients that read the first line of a generate stream and hang up leave no work behind: their one-step panels
    stop at the next one and the teacher is never streamed for them, so the next request does not wait for them. The
    work is held at a gate until the server has seen every hang-up (no timing is involved)."""
    import http.client

    url, models = server
    port = int(url.rsplit(":", 1)[1])
    counts = models.app.state.counts
    before = dict(counts)
    gate, streamed = threading.Event(), []
    one_step, teacher_stream = models.one_step, models.teacher_stream

    def gated(*a, **k):
        gate.wait(60)
        return one_step(*a, **k)

    def counted(*a, **k):
        streamed.append(a)
        return teacher_stream(*a, **k)

    monkeypatch.setattr(models, "one_step", gated)
    monkeypatch.setattr(models, "teacher_stream", counted)
    for seed in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/generate", json.dumps({"class": 1, "seed": seed}),
                     {"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().readline())["type"] == "start"
        conn.close()
    deadline = time.time() + 60
    while counts["abandoned"] < before["abandoned"] + 5 and time.time() < deadline:
        time.sleep(0.02)
    assert counts["abandoned"] == before["abandoned"] + 5
    gate.set()
    while counts["cancelled"] < before["cancelled"] + 5 and time.time() < deadline:
        time.sleep(0.02)
    assert counts["cancelled"] == before["cancelled"] + 5 and streamed == []
    assert events(url, {"class": 2, "seed": 0})[-1]["type"] == "done" and len(streamed) == 1


def test_eight_concurrent_clients(server):
    url, models = server
    errors, done = [], []

    def client(i):
        try:
            for j in range(3):
                ev = events(url, {"class": (i + j) % models.num_classes, "seed": 100 * i + j})
                assert ev[-1]["type"] == "done", ev[-1]
                done.append(ev[-1])
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(done) == 24
    assert all(v > 0 for d in done for v in d["latency_s"].values())


def test_throughput_rows(server, runs):
    _, models = server
    res = models.throughput(k=1, batch_sizes=(1, 4), repeats=1)
    keys = [r["key"] for r in res["rows"]]
    assert keys == ["teacher", "dd1", "mapkd", "mapkd-k"] + (["dd2"] if runs["dd2"] else [])
    for r in res["rows"]:
        assert r["throughput_b1"] > 0 and r["throughput_b4"] > 0 and r["speedup_b4"] > 0
    assert res["rows"][0]["speedup_b1"] == 1.0


def test_info_lists_runs_fids_and_ranges(server, runs):
    url, models = server
    with urllib.request.urlopen(url + "/api/info", timeout=30) as r:
        info = json.loads(r.read())
    assert info["classes"][0] == "T-shirt/top" and info["teacher_steps"] == models.teacher_steps
    assert info["runs"]["dd1"] == str(runs["dd1"]) and info["seed_max"] == 2 ** 31 - 1
    assert {row["method"] for row in info["fids"]["rows"]} >= {"teacher", "dd1-1step", "dd2-1step"}
    for asset in ("/", "/static/app.js", "/static/style.css"):
        with urllib.request.urlopen(url + asset, timeout=30) as r:
            page = r.read().decode()
            assert r.status == 200 and "http://" not in page and "https://" not in page  # no CDN


# ---- the command line ------------------------------------------------------------------------------------
def _cli(*args, env_extra=None, timeout=60):
    import os

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "onestep", "serve", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_cli_bad_port_and_port_in_use(runs):
    r = _cli("--port", "70000")
    assert r.returncode == 2 and "--port" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = _cli("--run", str(TEACHER), "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"onestep serve: error: port {port} on 127.0.0.1 is in use; pass another --port (0 picks a free one)"


def test_cli_serves_and_names_the_missing_runs(runs, tmp_path):
    import os

    (tmp_path / "fashion-mnist").mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "ONESTEP_ASSETS": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "onestep", "serve", "--run", str(TEACHER), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if "http://" in line:
                break
        assert any(ln.startswith("onestep serve: dd1: MISSING") for ln in lines), lines
        url = lines[-1].split()[2]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=30) as r:
            assert json.loads(r.read())["missing"] == ["dd1", "mapkd", "dd2"]
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server stops; it has nothing to resume
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, rest
        assert rest.strip().splitlines()[-1] == "onestep serve: stopped" and "resume" not in rest, rest
    finally:
        proc.kill()
        proc.wait(20)


# ---- the page in a real browser --------------------------------------------------------------------------
def test_page_in_headless_chromium(server, runs, tmp_path):
    from onestep.serve.browser import drive, find_chromium

    found = find_chromium()
    if isinstance(found, str):
        pytest.skip(found)
    url, models = server
    shot = tmp_path / "serve.png"
    res = drive(url + "/", shot, label=3, seed=7, browser=found[0], driver=found[1], timeout=60)
    panels = res["panels"]
    assert set(panels) == {"teacher", "dd1", "mapkd", "mapkd-k"} | ({"dd2"} if runs["dd2"] else set())
    assert all(p["done"] and p["src"].startswith("data:image/png") for p in panels.values())
    # the teacher's image went through intermediate states before its final one
    assert panels["teacher"]["frames"] == models.teacher_steps + 1 and panels["teacher"]["distinct"] > 2
    for key, p in panels.items():
        shown = float(p["latency_text"].split()[0])  # "12.34 ms" or "0.123 s"
        assert shown > 0 and p["latency"] > 0, (key, p["latency_text"])
        assert p["speedup_text"].endswith("x") or "x (reference)" in p["speedup_text"]
    assert res["walk"] and all(w["after"] != w["before"] and w["t"] == pytest.approx(0.6) for w in res["walk"].values())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
