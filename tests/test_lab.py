"""The LoRA lab (python -m lab): rank truncation math, renders, the server's safety, and the page in headless Chromium."""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lab
import lora
import sampling
import sd
from lab import server as lab_server
from lab.__main__ import main as lab_main
from lab.chromium import RENDERED, Chromium, find_chromium
from lab.settings import MAX_STEPS
from lora.io import read_tensors

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "toy" / "tiny_sd.safetensors"
PROMPT = "a large purple circle in the center, white background"
# Few steps and one seed: each render is a fraction of a second on the toy.
FAST = lab.Settings(prompt=PROMPT, steps=4, images=1, cfg=4.0, sampler="ddim")
FAST_ONE = lab.Settings(**{**FAST.to_json(), "loras": [0]})
FAST_RANK1 = lab.Settings(**{**FAST.to_json(), "loras": [0], "rank": 1})

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """On the built-in toy: a rank-4 LoRA on attention and conv layers (plus rank 2 on the text encoder), a LoHa,
    both with random non-zero factors, and a LoRA for another base."""
    folder = tmp_path_factory.mktemp("lab")
    g = torch.Generator().manual_seed(0)
    model = sd.load(TOY)
    lora.inject(model.unet, rank=4, alpha=2, targets="all")
    lora.inject(model.text_encoder, rank=2, targets="attn")
    with torch.no_grad():
        for layer in lora.lora_layers(model.unet) + lora.lora_layers(model.text_encoder):
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.3)
    lora.save(folder / "style.safetensors", model)
    model = sd.load(TOY)
    lora.inject(model.unet, rank=2, targets="attn", adapter="loha")
    with torch.no_grad():
        for p in lora.lora_parameters(model.unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save(folder / "hada.safetensors", model.unet)
    from unet import UNetConfig, UNetModel
    import dataclasses
    other = UNetModel(dataclasses.replace(UNetConfig.tiny_sd1(), context_dim=48))
    lora.inject(other, rank=4, targets="attn")
    lora.save(folder / "other_base.safetensors", other)
    return {"lora": folder / "style.safetensors", "loha": folder / "hada.safetensors",
            "other": folder / "other_base.safetensors"}


@pytest.fixture(scope="module")
def state(files):
    return lab.open_lab(TOY, [files["lora"], files["loha"]], defaults=FAST)


@pytest.fixture(scope="module")
def served(state):
    """The lab's server on a free port of 127.0.0.1, in a thread."""
    server = lab.make_server(state, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def request(server, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict | None = None) -> tuple[int, dict | bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, json.loads(data) if kind.startswith("application/json") else data


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


# ---------------------------------------------------------------------------------------- the math

def test_rank_k_update_is_the_svd_truncation_and_k_r_gives_the_file(state, files):
    tensors, _ = read_tensors(files["lora"])
    checked = 0
    for layer in state.adapters[0].layers.values():
        if layer.part != "unet" or layer.path != "input_blocks.1.1.transformer_blocks.0.attn2.to_k" \
                and layer.path != "input_blocks.1.0.in_layers.2":
            continue
        key = lora.kohya_name(layer.path, "unet", state.model.unet.cfg.num_res_blocks)
        down = tensors[f"{key}.lora_down.weight"].double().flatten(1)
        up = tensors[f"{key}.lora_up.weight"].double().flatten(1)
        alpha = float(tensors[f"{key}.alpha"])
        delta = alpha / down.shape[0] * up @ down  # ΔW as the file means it: (alpha/r)·B·A
        assert layer.rank == 4 and layer.alpha == pytest.approx(2.0)
        full = lab.best_rank_k(layer.u.double(), layer.s.double(), layer.vh.double(), None)
        assert torch.allclose(full, delta, atol=1e-6, rtol=1e-5)
        assert torch.allclose(lab.best_rank_k(layer.u.double(), layer.s.double(), layer.vh.double(), 4), delta,
                              atol=1e-6, rtol=1e-5)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # an independent SVD of the dense ΔW
        for k in (1, 2, 3):
            cut = lab.best_rank_k(layer.u.double(), layer.s.double(), layer.vh.double(), k)
            assert torch.allclose(cut, u[:, :k] @ torch.diag(s[:k]) @ vh[:k], atol=1e-6, rtol=1e-5)
            assert torch.linalg.matrix_rank(cut) == k
            # Eckart–Young: the error is the energy left out
            assert float(torch.linalg.norm(delta - cut)) == pytest.approx(float(s[k:].norm()), rel=1e-4)
            assert lab.energy_kept(layer.s, k) == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
        checked += 1
    assert checked == 2  # an attention layer and a 3x3 conv


def test_dense_adapter_truncates_its_update(state):
    """A LoHa's ΔW = s·(B1A1)⊙(B2A2) has rank up to 4 from rank-2 factors: its own SVD, cut the same way."""
    layer = next(iter(state.adapters[1].layers.values()))
    assert layer.adapter == "loha" and layer.rank == 4
    full = lab.best_rank_k(layer.u.double(), layer.s.double(), layer.vh.double(), None)
    s = torch.linalg.svdvals(full)
    assert torch.allclose(s[:4], layer.s.double(), rtol=1e-4)
    cut = lab.best_rank_k(layer.u.double(), layer.s.double(), layer.vh.double(), 1)
    assert float(torch.linalg.norm(full - cut)) == pytest.approx(float(s[1:].norm()), rel=1e-4)


# -------------------------------------------------------------------------------------------- renders

def test_full_rank_render_matches_the_live_lora_and_base_the_plain_model(state, files):
    (base_col, base), (lora_col, full) = lab.render(state, FAST_ONE)
    _, (_, cut) = lab.render(state, FAST_RANK1)
    assert (base_col.adapter, lora_col.adapter) == (None, 0)
    model = sd.load(TOY)
    plain = sampling.to_uint8(sampling.generate(model, [PROMPT], sampler="ddim", steps=4, cfg=4.0, seed=0, height=32,
                                                width=32, progress=False)).numpy()
    assert np.array_equal(base, plain)  # the base column is the model as loaded
    lora.load(files["lora"], model)      # live layers, as sample.py renders
    live = sampling.to_uint8(sampling.generate(model, [PROMPT], sampler="ddim", steps=4, cfg=4.0, seed=0, height=32,
                                               width=32, progress=False)).numpy()
    assert np.abs(full.astype(int) - live.astype(int)).max() <= 2  # W0 + ΔW written vs computed beside W0
    assert np.abs(cut.astype(int) - full.astype(int)).mean() > 2  # rank 1 visibly differs from rank 4
    for weight, w0 in state.weights.values():
        assert torch.equal(weight, w0)  # every render leaves the weights at W0


def test_sdxl_with_both_text_towers_and_packed_qkv(tmp_path):
    """A tiny SDXL: LoRAs on the UNet and both text towers, OpenCLIP's packed q/k/v a dense update of rank 3·2."""
    from sd.checkpoint import write_state_dict
    from sd.tiny import tiny_state_dict

    ckpt = write_state_dict(tmp_path / "xl.safetensors", tiny_state_dict("sdxl", seed=5))
    model = sd.load(ckpt)
    lora.inject(model.unet, rank=2, targets="attn")
    lora.inject(model.text_encoder, rank=2, targets="attn")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_parameters(model.unet) + lora.lora_parameters(model.text_encoder):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save(tmp_path / "xl_lora.safetensors", model)
    state = lab.open_lab(ckpt, [tmp_path / "xl_lora.safetensors"], size=32,
                         defaults=lab.Settings(prompt="a cat", steps=2, images=1))
    layers = state.adapters[0].layers.values()
    assert {ly.part for ly in layers} == {"unet", "te1", "te2"} and {ly.group for ly in layers} >= {"down", "text"}
    qkv = next(ly for ly in layers if ly.adapter == "packed")
    assert qkv.rank == 6 and qkv.name.startswith("te2:") and qkv.block.startswith("te2:layers.")
    (_, base), (_, full) = lab.render(state, state.defaults)
    _, (_, one) = lab.render(state, lab.Settings(**{**state.defaults.to_json(), "rank": 1}))
    assert full.shape == (1, 32, 32, 3) and np.abs(full.astype(int) - one.astype(int)).mean() > 1
    for weight, w0 in state.weights.values():
        assert torch.equal(weight, w0)


def test_switches_scale_alpha_and_per_layer_rank(state):
    layer = state.adapters[0].layers["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    conv = state.adapters[0].layers["input_blocks.1.0.in_layers.2"]
    text = next(ly for ly in state.adapters[0].layers.values() if ly.part != "unet")
    assert (layer.group, layer.kind, conv.kind, text.group, text.rank) == ("down", "attention", "conv", "text", 2)
    s = lab.Settings(scale=0.5, alpha=8.0, kinds=["attention"], groups=["down", "up"], rank=4,
                     layer_ranks={layer.name: 1})
    full = lab.best_rank_k(layer.u, layer.s, layer.vh, None).view(layer.shape)
    one = lab.best_rank_k(layer.u, layer.s, layer.vh, 1).view(layer.shape)
    assert torch.allclose(lab.layer_delta(layer, s), 0.5 * 8.0 / 2.0 * one)  # scale · alpha/alpha_file · ΔW_1
    assert torch.allclose(lab.layer_delta(layer, lab.Settings()), full)
    assert not lab.layer_delta(conv, s).any()  # conv switched off
    assert not lab.layer_delta(text, s).any()  # text encoder switched off
    label = lab.column_label(state, 0, s)
    assert label.startswith("style · k=r=4 (1 layer set)") and "×0.5" in label and "α=8" in label and "off: mid,text,conv" in label


def test_settings_refuse_bad_values():
    kw = dict(layer_names={"a.b"}, max_rank=4, n_loras=2)
    assert lab.parse_settings({"rank": 2, "layer_ranks": {"a.b": 1}}, **kw).rank == 2
    for bad in ({"steps": MAX_STEPS + 1}, {"steps": True}, {"seed": -1}, {"rank": 5}, {"rank": 1.5},
                {"prompt": "x" * 501}, {"scale": float("nan")}, {"layer_ranks": {"../../etc/passwd": 1}},
                {"groups": ["down", "sideways"]}, {"loras": [2]}, {"ranks": [1] * 9}, {"ranks": [0]}, {"alpha": 0}, {"sampler": "magic"},
                {"path": "/etc/passwd"}, {"base": False, "loras": []}, [1, 2]):
        with pytest.raises(lab.SettingsError):
            lab.parse_settings(bad, **kw)


# ------------------------------------------------------------------------------------------- server

def test_served_image_equals_the_python_render(served, state):
    status, result = request(served, "POST", "/api/render", {"rank": 2, "loras": [0, 1], "seed": 5})
    assert status == 200 and (result["columns"], result["rows"]) == (3, 1)
    assert [c["label"].split(" · ")[0] for c in result["cells"]] == ["base", "style", "hada"]
    settings = lab.Settings(**result["settings"])
    with served.app.renderer.lock:
        expected = lab.render(state, settings)
    for cell, (_, images) in zip(result["cells"], expected):
        assert np.array_equal(decode_png(cell["png"]), images[0])


def test_a_column_per_rank(served, state):
    status, result = request(served, "POST", "/api/render", {"ranks": [1, 4], "loras": [0], "base": False})
    assert status == 200 and [c["label"] for c in result["cells"]] == ["style · k=1 · ×1 · α=2", "style · k=r=4 · ×1 · α=2"]
    with served.app.renderer.lock:
        (_, one), = lab.render(state, lab.Settings(**{**FAST_ONE.to_json(), "base": False, "rank": 1}))
        (_, full), = lab.render(state, lab.Settings(**{**FAST_ONE.to_json(), "base": False}))
    assert np.array_equal(decode_png(result["cells"][0]["png"]), one[0])
    assert np.array_equal(decode_png(result["cells"][1]["png"]), full[0])


def test_spectrum_panel_agrees_with_analysis_spectrum(served, state, files):
    import analysis

    base = analysis.load_base(TOY)
    run = analysis.load_run(files["lora"], base, progress=False)
    ref = analysis.spectrum([run], progress=False)
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    status, panel = request(served, "POST", "/api/spectrum", {"adapter": 0, "layer": name, "settings": {"rank": 1}})
    assert status == 200
    expected = np.asarray(ref.data["singular_values"][run.label][name])
    assert np.allclose(panel["singular_values"], expected, rtol=1e-5)
    row = next(r for r in ref.rows if r["layer"] == name)
    assert panel["fro"] == pytest.approx(row["fro"], rel=1e-5)
    assert panel["k"] == 1 and panel["energy_kept"] == pytest.approx(expected[0] ** 2 / (expected ** 2).sum())
    block = next(b for b in panel["blocks"] if b["block"] == "input_blocks.1")
    summary = next(r for r in ref.summary if r["block"] == "input_blocks.1")
    assert block["file"] == pytest.approx(summary["fro"], rel=1e-5)


def test_bad_requests_get_json_errors_and_the_server_goes_on(served):
    cases = [
        ("GET", "/../../etc/passwd", None, {}, 404),
        ("GET", "/static/../state.py", None, {}, 404),
        ("GET", "/lab/server.py", None, {}, 404),
        ("GET", "/api/render", None, {}, 405),
        ("POST", "/api/render", "{not json", {}, 400),
        ("POST", "/api/render", {"steps": MAX_STEPS + 1}, {}, 400),
        ("POST", "/api/render", {"images": 1000}, {}, 400),
        ("POST", "/api/render", {"images": 4, "ranks": [1, 2, 3, 4]}, {}, 400),  # 36 images: over MAX_CELLS
        ("POST", "/api/render", {"ckpt": "/etc/passwd"}, {}, 400),
        ("POST", "/api/spectrum", {"adapter": 0, "layer": "/etc/passwd"}, {}, 400),
        ("POST", "/api/spectrum", {"adapter": 7, "layer": "x"}, {}, 400),
        ("POST", "/api/render", "x" * (lab_server.MAX_BODY_BYTES + 1), {}, 413),
        ("DELETE", "/api/render", None, {}, 405),
    ]
    for method, path, body, headers, code in cases:
        status, data = request(served, method, path, body, headers)
        assert status == code, (method, path, data)
        assert data["error"] and data["status"] == code
        assert request(served, "GET", "/api/info")[0] == 200  # still serving
    status, page = request(served, "GET", "/")
    assert status == 200 and b"<script src" not in page and b"<link" not in page and b"url(" not in page  # no assets


def test_renders_beyond_the_queue_are_refused(served):
    app = served.app
    app.waiting = lab_server.MAX_WAITING + 1  # as if that many renders were running or queued
    try:
        status, data = request(served, "POST", "/api/render", {})
    finally:
        app.waiting = 0
    assert status == 429 and "busy" in data["error"]
    assert request(served, "POST", "/api/render", {"loras": [1], "base": False})[0] == 200


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_names_a_bad_file_in_one_line(files, capsys, tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for argv, needle in ([["--ckpt", str(tmp_path / "nope.safetensors")], "nope.safetensors: no such file"],
                         [["--lora", str(tmp_path / "gone.safetensors")], "gone.safetensors: no such file"],
                         [["--lora", str(empty)], "empty.safetensors: the file is empty"],
                         [["--lora", str(files["other"])], "other_base.safetensors does not fit"]):
        with pytest.raises(SystemExit) as exit_:
            lab_main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):
        lab_main(["--help"])
    text = capsys.readouterr().out
    for option in ("--ckpt", "--lora", "--host", "--port", "--device", "--dtype", "--size", "--threads", "--verbose"):
        assert option in text


def test_no_arguments_mean_the_toy_and_its_default_run(files, capsys, tmp_path, monkeypatch):
    from lab.__main__ import DEFAULT_RUN, build_parser, check_args

    monkeypatch.chdir(tmp_path)  # no runs/ here: the base alone, and a line saying how to make the LoRA
    args = build_parser().parse_args([])
    assert check_args(args, build_parser()) == [] and args.ckpt == TOY
    assert "python train.py" in capsys.readouterr().err
    (tmp_path / DEFAULT_RUN).parent.mkdir(parents=True)
    (tmp_path / DEFAULT_RUN).write_bytes(files["lora"].read_bytes())
    args = build_parser().parse_args([])
    assert check_args(args, build_parser()) == [DEFAULT_RUN] and args.host == "127.0.0.1"


def test_cli_serves_on_localhost_and_stops_on_ctrl_c(files):
    # As from a terminal: Ctrl-C raises KeyboardInterrupt even where this test runs with SIGINT ignored (a job
    # started in the background by a script inherits that, and Python keeps an ignored SIGINT ignored).
    terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv[0] = 'lab'; runpy.run_module('lab', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", terminal, "--lora", str(files["lora"]), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "ready" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "lab exited early"
        assert "http://127.0.0.1:" in line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/info")
        assert json.loads(conn.getresponse().read())["adapters"][0]["label"] == "style"
        conn.close()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert err.strip().splitlines()[-1] == "lab: stopped" and "Traceback" not in err


# ------------------------------------------------------------------------------------------ browser

# The displayed images' pixels, read back through a canvas: what the page shows, after the browser decoded it.
READ_PIXELS = """(() => [...document.querySelectorAll('#grid img')].map((img) => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  return { column: Number(img.dataset.column), label: img.alt,
           rgba: Array.from(g.getImageData(0, 0, c.width, c.height).data) };
}))()"""

MOVE_RANK = """(() => { const s = document.getElementById('rank'); s.value = '{k}';
  s.dispatchEvent(new Event('input', { bubbles: true })); return s.max; })()"""


def shown(browser, height: int, width: int) -> list[np.ndarray]:
    cells = browser.evaluate(READ_PIXELS)
    return [np.asarray(c["rgba"], dtype=np.uint8).reshape(height, width, 4)[..., :3] for c in cells]


def test_page_in_chromium_rank_slider_rerenders_what_python_renders(served, state):
    if find_chromium() is None:
        pytest.skip("headless Chromium not found: `apt-get install chromium` (Debian's package; .ci/run installs it "
                    "where apt works), or set LAB_CHROMIUM to the browser")
    host, port = served.server_address[:2]
    with Chromium(width=1200, height=800, timeout=60) as browser:
        browser.goto(f"http://{host}:{port}/")
        browser.wait_for(RENDERED.format(n=1))
        assert browser.evaluate("window.lab.error") is None
        first = shown(browser, state.height, state.width)
        assert browser.evaluate(MOVE_RANK.replace("{k}", "1")) == str(state.max_rank)
        browser.wait_for(RENDERED.format(n=2))
        assert browser.evaluate("document.getElementById('rank-v').textContent") == f"k = 1 of {state.max_rank}"
        second = shown(browser, state.height, state.width)
        sent = browser.evaluate("window.lab.last.settings")
        labels = browser.evaluate("[...document.querySelectorAll('#grid th')].map((th) => th.textContent)")
    assert sent["rank"] == 1 and len(first) == len(second) == 3  # base, style, hada; one seed
    assert "style · k=1 · ×1 · α=2" in labels
    with served.app.renderer.lock:
        expected = lab.render(state, lab.Settings(**sent))
    for image, (_, images) in zip(second, expected):
        assert np.array_equal(image, images[0])  # the page shows exactly what the Python API renders
    assert np.array_equal(first[0], second[0])  # the base column does not move with the rank
    assert np.abs(first[1].astype(int) - second[1].astype(int)).mean() > 2  # the LoRA columns do
