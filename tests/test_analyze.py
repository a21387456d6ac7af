"""analysis: the analyses on synthetic matrices with known answers, extract/resize round trips, bad input."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import analysis as la
import lora
import sd
from analysis import spectral as sp
from analysis.deltas import Delta, Run
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def planted(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    diag = torch.diag(torch.tensor(s, dtype=torch.float64))
    return orthonormal(m, len(s), seed) @ diag @ orthonormal(n, len(s), seed + 1).T


def dense_run(label: str, mats: dict[str, torch.Tensor], bases: dict[str, torch.Tensor] | None = None) -> Run:
    """A 'full fine-tune' held in memory: W_tuned = W0 + ΔW."""
    deltas = {}
    for name, dw in mats.items():
        w0 = (bases or {}).get(name, torch.zeros_like(dw))
        deltas[name] = Delta(name=name, shape=tuple(dw.shape), tuned=lambda w=w0 + dw: w, base=w0)
    return Run(label, label, "full", deltas)


def lora_run(label: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0,
             bases: dict[str, torch.Tensor] | None = None) -> Run:
    deltas = {n: Delta(name=n, shape=(up.shape[0], down.shape[1]), up=up, down=down, scale=scale,
                       base=(bases or {}).get(n)) for n, (up, down) in factors.items()}
    return Run(label, label, "lora", deltas)


# ------------------------------------------------------------------------------------------- the math

@pytest.mark.parametrize("method", ["gram", "lapack"])
@pytest.mark.parametrize("shape", [(48, 48), (40, 300), (300, 40)])
def test_planted_rank_r_gives_rank_r_and_its_singular_values(method, shape):
    s = [10.0, 3.0, 1.0, 0.5, 0.1]
    dw = planted(*shape, s)
    u, got, vh = sp.svd(dw[None], method=method)
    torch.testing.assert_close(got[0, :5], torch.tensor(s, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert int(sp.numerical_rank(got[0])) == 5
    torch.testing.assert_close((u[0, :, :5] * got[0, :5]) @ vh[0, :5], dw, atol=1e-9, rtol=0)
    total = sum(x * x for x in s)
    assert float(sp.stable_rank(got[0])) == pytest.approx(total / 100)
    assert int(sp.energy_rank(got[0], 0.9)) == 1       # 100 / 110.26 = 0.907
    assert int(sp.energy_rank(got[0], 0.99)) == 3      # 109 / 110.26 < 0.99 <= 110 / 110.26
    assert int(sp.energy_rank(got[0], 1.0)) == 5
    assert int(sp.energy_rank(torch.zeros(4), 0.9)) == 0


def test_lowrank_svd_equals_the_dense_svd_of_its_product():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(3, 30, 4, generator=g), torch.randn(3, 4, 50, generator=g)
    u, s, vh = sp.lowrank_svd(up, down, torch.tensor([0.5, 1.0, 2.0]))
    dense = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None] * (up.double() @ down.double())
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:, :4])
    torch.testing.assert_close((u * s[:, None, :]) @ vh, dense)


def test_spectrum_of_a_lora_and_of_a_full_update():
    g = torch.Generator().manual_seed(0)
    lo = lora_run("lora", {"a.to_q": (torch.randn(32, 3, generator=g), torch.randn(3, 40, generator=g))}, scale=0.5)
    w0 = torch.randn(32, 40, generator=g, dtype=torch.float64)
    full = dense_run("full", {"a.to_q": planted(32, 40, [4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])}, {"a.to_q": w0})
    result = la.spectrum([lo, full], fraction=0.9, progress=False)
    rows = {r["run"]: r for r in result.rows}
    assert rows["lora"]["numerical_rank"] == 3 and rows["lora"]["r"] == 3
    assert rows["full"]["numerical_rank"] == 7
    assert rows["full"]["rank@0.9"] == 5            # top 5: (16+4+1+1+1)/25 = 0.92 >= 0.9 > top 4: 22/25
    assert rows["full"]["fro"] == pytest.approx(5.0)
    assert rows["full"]["rel_fro"] == pytest.approx(5.0 / float(w0.norm()))
    assert result.summary and "spectrum_energy.png" in result.figures


def test_subspace_similarity_known_answers():
    n = 64
    basis = orthonormal(n, 12, seed=3)
    a1 = (torch.randn(4, 4, dtype=torch.float64) @ basis[:, :4].T).float()    # A's rows span e1..e4 of the basis
    a2 = (torch.randn(8, 8, dtype=torch.float64) @ basis[:, 4:12].T).float()  # ... and e5..e12: orthogonal
    up1, up2 = torch.randn(16, 4), torch.randn(16, 8)
    one = lora_run("one", {"l": (up1, a1)})
    same = lora_run("same", {"l": (up1.clone(), a1.clone())})
    other = lora_run("other", {"l": (up2, a2)})
    phi = la.subspace(one, same, progress=False).data["phi"]["l"]
    torch.testing.assert_close(torch.as_tensor(phi), torch.ones(4, 4, dtype=torch.float64))
    res = la.subspace(one, other, progress=False)
    assert res.data["phi"]["l"].shape == (4, 8)
    assert float(abs(torch.as_tensor(res.data["phi"]["l"])).max()) < 1e-10
    # A subspace inside another: φ(i, r2) = 1 for every i.
    inner = lora_run("inner", {"l": (up1[:, :2], (basis[:, :2].T).float())})
    outer = lora_run("outer", {"l": (up2, (basis[:, :8].T).float())})
    phi = torch.as_tensor(la.subspace(inner, outer, progress=False).data["phi"]["l"])
    torch.testing.assert_close(phi[:, -1], torch.ones(2, dtype=torch.float64))
    # The random control sits near its expectation max(i, j)/n.
    row = res.rows[0]
    assert abs(row["random_mean_phi"] - row["expected_random_mean_phi"]) < 0.08


def test_subspace_of_the_update_itself_for_full_fine_tunes():
    v = orthonormal(40, 6, seed=1)
    u = orthonormal(30, 6, seed=2)
    dw = u @ torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64)) @ v.T
    full = dense_run("full", {"l": dw})
    lo = lora_run("lora", {"l": ((u[:, :3] * 2).float(), v[:, :3].T.float())})
    res = la.subspace(lo, full, rank=6, progress=False)
    assert res.data["factor"] == "dW"
    phi = torch.as_tensor(res.data["phi"]["l"])     # the LoRA's 3 directions are full's top 3
    assert phi.shape == (3, 6) and phi[2, 2] == pytest.approx(1.0) and phi[0, 5] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs two LoRAs"):
        la.subspace(lo, full, factor="A", progress=False)


def test_amplification_matches_its_definition():
    m = n = 24
    u, v = orthonormal(m, m, 5), orthonormal(n, n, 6)
    s = torch.linspace(10, 0.5, m, dtype=torch.float64)
    w = u @ torch.diag(s) @ v.T
    # ΔW along W's weakest two directions, then along its strongest two.
    weak = 3.0 * u[:, -2:] @ v[:, -2:].T
    strong = 3.0 * u[:, :2] @ v[:, :2].T
    runs = [dense_run("weak", {"l": weak}, {"l": w}), dense_run("strong", {"l": strong}, {"l": w})]
    rows = {r["run"]: r for r in la.amplification(runs, ranks=[2], progress=False).rows}
    for row in rows.values():
        assert row["r"] == 2 and row["proj_W"] == pytest.approx(float(s[:2].norm()))
        assert row["fro_W"] == pytest.approx(float(s.norm())) and row["fro_dW"] == pytest.approx(3 * math.sqrt(2))
    assert rows["weak"]["proj_dW"] == pytest.approx(float(s[-2:].norm()))
    assert rows["strong"]["proj_dW"] == pytest.approx(float(s[:2].norm()))
    assert rows["weak"]["amplification"] == pytest.approx(3 * math.sqrt(2) / float(s[-2:].norm()))
    assert rows["weak"]["proj_random"] < rows["weak"]["proj_W"]
    with pytest.raises(ValueError, match="base"):
        la.amplification([lora_run("nobase", {"l": (torch.randn(4, 1), torch.randn(1, 4))})], progress=False)


def test_intruders_known_answers():
    m = 64
    w0 = orthonormal(m, m, 7) @ torch.diag(torch.linspace(2, 1, m, dtype=torch.float64)) @ orthonormal(m, m, 8).T
    x = torch.randn(m, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.randn(m, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    big = 20 * (x / x.norm()) @ (y / y.norm()).T          # a new dominant direction, unrelated to W0's
    tiny = 1e-6 * big
    runs = [dense_run("new", {"l": big}, {"l": w0}), dense_run("tiny", {"l": tiny}, {"l": w0})]
    res = la.intruders(runs, top_k=5, thresholds=[0.1, 0.6, 0.99], progress=False)
    rows = {r["run"]: r for r in res.rows}
    # A unit vector has |cos| >= 1/sqrt(64) with some vector of a full basis: never below 0.1.
    assert rows["new"]["intruders@0.1"] == 0
    assert rows["new"]["intruders@0.6"] == 1
    assert all(rows["tiny"][f"intruders@{e:g}"] == 0 for e in (0.1, 0.6, 0.99))
    assert rows["tiny"]["min_best_cos"] > 0.999


# ------------------------------------------------------------------------------------- real files

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD1 base, a rank-4 LoRA on it (attention, MLP and 3x3 convs), the merged model, and an SD2-sized LoRA."""
    root = tmp_path_factory.mktemp("analyze")
    base_path = write_state_dict(root / "base.safetensors", tiny_state_dict("sd1", seed=1))
    model = sd.load(base_path)
    lora.inject(model.unet, 4, 2.0, "all", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model.unet):
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)
    deltas = {p: layer.lora_weight().detach().double() for p, layer in lora.named_lora_layers(model.unet)}
    lora.save(root / "a.safetensors", model.unet, dtype=torch.float32)
    model.save(root / "merged.safetensors", tensors=lora.merged_state_dict(model))  # W0 + ΔW, fp32
    write_state_dict(root / "sd2.safetensors", tiny_state_dict("sd2", seed=1))
    # Another model: the same UNet but a 48-wide text context, so the cross-attention to_k / to_v differ.
    from unet import UNetConfig, UNetModel
    other = UNetModel(dataclasses.replace(UNetConfig.tiny_sd1(), context_dim=48))
    lora.inject(other, 4, None, "attn")
    lora.save(root / "other_lora.safetensors", other)
    return {"root": root, "base": str(base_path), "lora": str(root / "a.safetensors"),
            "merged": str(root / "merged.safetensors"), "deltas": deltas, "sd2": str(root / "sd2.safetensors"),
            "other_lora": str(root / "other_lora.safetensors")}


def test_runs_from_files_name_layers_by_module_path_and_give_the_lora_update(files):
    base = la.load_base(files["base"])
    run = la.load_run(files["lora"], base)
    assert set(run.deltas) == set(files["deltas"])
    for name, d in run.deltas.items():
        torch.testing.assert_close(d.matrix(), files["deltas"][name].flatten(1), rtol=1e-5, atol=1e-7)
        assert d.base is not None
    assert not lora.lora_layers(base.model.unet)               # the base is left as it was
    full = la.load_run(files["merged"], base)
    assert full.kind == "full" and set(full.deltas) == set(files["deltas"])   # unchanged layers are left out
    assert full.skipped
    name = next(iter(full.deltas))
    torch.testing.assert_close(full.deltas[name].matrix(), files["deltas"][name].flatten(1), rtol=1e-4, atol=1e-6)
    # Without a base, the LoRA is read from the file under its own names.
    bare = la.load_run(files["lora"])
    assert len(bare.deltas) == len(run.deltas) and all(n.startswith("lora_unet_") for n in bare.deltas)
    assert sorted(float(d.matrix().norm()) for d in bare.deltas.values()) == pytest.approx(
        sorted(float(d.matrix().norm()) for d in run.deltas.values()), rel=1e-6)


def test_extract_from_a_lora_merged_model_recovers_the_lora(files, tmp_path):
    out = tmp_path / "extracted.safetensors"
    result = la.extract(files["merged"], files["base"], rank=4, out=out, dtype=torch.float32, progress=False)
    assert result.summary[0]["kept_energy"] > 1 - 1e-9
    assert all(r["r"] == 4 for r in result.rows)
    model = sd.load(files["base"])
    loaded = lora.load(out, model.unet)
    assert len(loaded.modules) == len(files["deltas"])
    for path, layer in lora.named_lora_layers(model.unet):
        want = files["deltas"][path]
        torch.testing.assert_close(layer.lora_weight().double(), want, rtol=0, atol=2e-6 * float(want.abs().max()))
    # A lower rank keeps exactly the top singular values' share of the energy.
    low = la.extract(files["merged"], files["base"], rank=2, out=tmp_path / "r2.safetensors", progress=False)
    name = low.rows[0]["layer"]
    s = torch.linalg.svdvals(files["deltas"][name].flatten(1))
    assert low.rows[0]["kept_energy"] == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    assert load_file(tmp_path / "r2.safetensors")[next(k for k in load_file(tmp_path / "r2.safetensors")
                                                       if k.endswith("down.weight"))].dtype == torch.float16


def test_resize_is_the_best_lower_rank_lora_and_keeps_the_file_layout(files, tmp_path):
    same = la.resize(files["lora"], 4, tmp_path / "same.safetensors", progress=False)
    assert same.summary[0]["kept_energy"] == pytest.approx(1.0)
    model = sd.load(files["base"])
    lora.load(tmp_path / "same.safetensors", model.unet)
    for path, layer in lora.named_lora_layers(model.unet):
        torch.testing.assert_close(layer.lora_weight().double(), files["deltas"][path], rtol=1e-5, atol=1e-7)
    small = la.resize(files["lora"], 2, tmp_path / "small.safetensors", progress=False)
    model = sd.load(files["base"])
    lora.load(tmp_path / "small.safetensors", model.unet)
    for path, layer in lora.named_lora_layers(model.unet):
        dense = files["deltas"][path].flatten(1)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert layer.rank == 2
        torch.testing.assert_close(layer.lora_weight().double().flatten(1), best, rtol=1e-4, atol=1e-6)
    assert set(load_file(tmp_path / "small.safetensors")) == set(load_file(files["lora"]))


def test_resize_reads_rslora_and_diffusers_files(tmp_path):
    from unet import UNetConfig, UNetModel
    unet = UNetModel(UNetConfig.tiny_sd1())
    lora.inject(unet, 8, 4.0, "attn", rs=True)
    with torch.no_grad():
        for layer in lora.lora_layers(unet):
            layer.lora_up.weight.normal_(0, 0.1)
    want = {p: layer.lora_weight().double() for p, layer in lora.named_lora_layers(unet)}
    for fmt in ("kohya", "diffusers"):
        src = tmp_path / f"{fmt}.safetensors"
        lora.save(src, unet, format=fmt)
        la.resize(src, 8, tmp_path / f"{fmt}_same.safetensors", progress=False)
        fresh = UNetModel(UNetConfig.tiny_sd1())
        fresh.load_state_dict(lora.base_state_dict(unet))
        lora.load(tmp_path / f"{fmt}_same.safetensors", fresh)
        for path, layer in lora.named_lora_layers(fresh):
            torch.testing.assert_close(layer.lora_weight().double(), want[path], rtol=1e-3, atol=1e-5)
        keys = load_file(tmp_path / f"{fmt}_same.safetensors")
        assert any(k.endswith("lora_A.weight") for k in keys) == (fmt == "diffusers")


def test_params_counts_d_k_and_r_d_plus_k(tmp_path):
    # The well-known count: a rank-4 LoRA on SD1.5's attention projections has 797,184 parameters.
    res = la.params("sd15", ranks=[4], targets="attn")
    assert res.summary[0]["lora_r_dk"] == 797_184 and res.summary[0]["layers"] == 128
    # The file-size estimate is the size of the file lora.save writes (up to its metadata).
    tiny = la.params("tiny", ranks=[4, 8], targets="attn-mlp", text_encoder=True)
    from text import ClipLConfig, ClipLTextEncoder
    from unet import UNetConfig, UNetModel
    te = ClipLTextEncoder(ClipLConfig.tiny())
    unet = UNetModel(dataclasses.replace(UNetConfig.tiny_sd1(), context_dim=te.config.width))
    lora.inject(unet, 8, None, "attn-mlp")
    lora.inject(te, 8, None, "attn-mlp")
    tensors = lora.lora_state_dict({"unet": unet, "text_encoder": te}, dtype=torch.float16)
    save_file(tensors, tmp_path / "x.safetensors")
    row = next(r for r in tiny.summary if r["rank"] == 8)
    assert row["lora_r_dk"] == sum(t.numel() for k, t in tensors.items() if not k.endswith("alpha"))
    assert row["file_MB"] * 2**20 == pytest.approx((tmp_path / "x.safetensors").stat().st_size, rel=0.02)
    assert any(r["block"].startswith("te:") for r in tiny.rows)


# ---------------------------------------------------------------------------------------- bad input

def test_bad_input_gets_clear_errors(files, tmp_path):
    base = la.load_base(files["base"])
    with pytest.raises(ValueError, match="does not fit the base model"):
        la.load_run(files["other_lora"], base)                    # a LoRA for another model
    with pytest.raises(ValueError, match="not the same model architecture"):
        la.load_run(files["sd2"], base)                           # a full checkpoint of another model
    with pytest.raises(ValueError, match="pass the base"):
        la.load_run(files["merged"])                              # a full checkpoint needs its base
    with pytest.raises(ValueError, match="no layer differs"):
        la.load_run(files["base"], base)
    # An adapter file is a valid input to extract since every adapter's ΔW is read (tests/test_analyze_adapters.py).
    assert la.extract(files["lora"], base, rank=2, out=tmp_path / "x.safetensors", progress=False).rows
    attn_only = la.load_run(files["lora"], base, targets="attn")
    everything = la.load_run(files["lora"], base)
    with pytest.raises(ValueError, match="do not adapt the same layers"):
        la.subspace(attn_only, everything, progress=False)
    assert la.subspace(attn_only, everything, common=True, progress=False).rows
    with pytest.raises(ValueError, match="no layers left"):
        la.load_run(files["lora"], base, targets="*nothing*")


def test_cli_writes_tables_and_plots_and_reports_errors(files, tmp_path, capsys):
    out = tmp_path / "spec"
    assert la.main(["spectrum", files["lora"], files["merged"], "--base", files["base"], "--labels", "lora,full",
                    "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "rank@0.9_median" in text and "full" in text
    data = json.loads((out / "spectrum.json").read_text())
    assert {r["run"] for r in data["rows"]} == {"lora", "full"}
    assert (out / "spectrum.csv").read_text().startswith("run,layer,block")
    assert (out / "spectrum_energy.png").stat().st_size > 1000
    assert la.main(["subspace", files["lora"], files["lora"], "--out", str(tmp_path / "sub"), "--quiet",
                    "--layers", "*attn1*"]) == 0
    sub = json.loads((tmp_path / "sub" / "subspace.json").read_text())
    assert all(r["phi_1_1"] == pytest.approx(1.0) for r in sub["rows"])
    assert (tmp_path / "sub" / "subspace_heatmaps.png").is_file()
    assert la.main(["resize", files["lora"], "--rank", "2", "--out", str(tmp_path / "r2.safetensors"), "--quiet",
                    "--no-plots"]) == 0
    assert (tmp_path / "r2_report" / "resize.csv").is_file()
    capsys.readouterr()
    assert la.main(["amplification", files["other_lora"], "--base", files["base"], "--out", str(tmp_path / "amp"),
                    "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit the base model" in err and "shape mismatches" in err
