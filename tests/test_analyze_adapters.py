"""analysis on every adapter: the ΔW of DoRA, LoHa, LoKr and Tucker LoRA files is the one their merge adds."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import analysis as la
import lora
import sd
from sd.checkpoint import write_state_dict
from sd.tiny import tiny_state_dict


def _randomise(unet: torch.nn.Module, seed: int) -> None:
    """Random factors everywhere (the inits leave ΔW = 0; DoRA's magnitude moves off ‖W0‖ too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(unet):
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p if p.ndim and p.shape[-1] == 1 else 0))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD1 base and, per adapter, its file and the merged ΔW per module path (merged weight − W0)."""
    root = tmp_path_factory.mktemp("adapters")
    base_path = write_state_dict(root / "base.safetensors", tiny_state_dict("sd1", seed=1))
    out = {"root": root, "base": str(base_path)}
    for adapter, options in (("loha", {}), ("lokr", {"factor": 4}), ("dora", {}), ("lora", {"tucker": True}),
                             ("loha_attn", {})):
        model = sd.load(base_path)
        targets = "all" if adapter in ("loha", "lora") else "attn"
        adapter_name, adapter = adapter, adapter.removesuffix("_attn")
        lora.inject(model.unet, 4, 2.0, targets, dtype=torch.float32, adapter=adapter, **options)
        _randomise(model.unet, seed=len(adapter_name))
        path = root / f"{adapter_name}.safetensors"
        lora.save(path, model.unet, dtype=torch.float32)
        w0 = {p: layer.weight.detach().clone() for p, layer in lora.named_lora_layers(model.unet)}
        lora.merge(model.unet)
        out[adapter_name] = (str(path), {p: (layer.weight.detach().double() - w0[p].double()).flatten(1)
                                    for p, layer in lora.named_lora_layers(model.unet)})
    return out


@pytest.mark.parametrize("adapter", ["loha", "lokr", "dora", "lora"])
def test_spectrum_of_an_adapter_file_equals_the_spectrum_of_its_merged_update(files, adapter):
    path, merged = files[adapter]
    run = la.load_run(path, la.load_base(files["base"]))
    assert set(run.deltas) == set(merged) and run.kind == adapter
    for name, d in run.deltas.items():
        torch.testing.assert_close(d.matrix(), merged[name], rtol=1e-4, atol=1e-5)
    result = la.spectrum([run], progress=False)
    for row in result.rows:
        s = torch.linalg.svdvals(merged[row["layer"]])
        assert row["fro"] == pytest.approx(float(s.norm()), rel=1e-5)
        assert row["spectral"] == pytest.approx(float(s[0]), rel=1e-5)
        assert row["r"] == adapter or (adapter == "lora" and row["r"] == 4)  # Tucker LoRA: only kxk convs dense
    assert any(row["r"] == adapter for row in result.rows)
    if adapter == "dora":  # W' − W0 depends on W0: a bare file cannot give it
        with pytest.raises(ValueError, match="DoRA.*base"):
            la.load_run(path)
    else:  # without a base, the file's own factors give the same updates under the file's names
        bare = la.load_run(path)
        assert sorted(float(d.matrix().norm()) for d in bare.deltas.values()) == pytest.approx(
            sorted(float(m.norm()) for m in merged.values()), rel=1e-5)


@pytest.mark.parametrize("which", ["attn, the file alone", "all, on its base"])
def test_resize_of_a_loha_file_to_rank_r_is_its_truncated_svd(files, tmp_path, which):
    out = tmp_path / "loha_r2.safetensors"
    if which.startswith("all"):  # 3x3 convs too: a LoHa file keeps their kernel flat, the base gives their shape
        path, merged = files["loha"]
        result = la.resize(path, 2, out, dtype=torch.float32, base=files["base"], progress=False)
    else:
        path, merged = files["loha_attn"]
        result = la.resize(path, 2, out, dtype=torch.float32, progress=False)
    assert all(r["r"] == 2 for r in result.rows)
    model = sd.load(files["base"])
    lora.load(out, model.unet)  # an ordinary LoRA file, convs included
    assert len(lora.lora_layers(model.unet)) == len(merged)
    for p, layer in lora.named_lora_layers(model.unet):
        assert layer.kind == "lora" and layer.rank == 2
        u, s, vh = torch.linalg.svd(merged[p], full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(layer.lora_weight().double().flatten(1), best, rtol=1e-4, atol=1e-6)
        row = next(r for r in result.rows if r["fro_dW"] == pytest.approx(float(s.norm()), rel=1e-5))
        assert row["kept_energy"] == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
    assert all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in load_file(out))


@pytest.mark.parametrize("adapter", ["dora", "lokr"])
def test_extract_writes_the_best_rank_r_lora_of_an_adapter_run(files, adapter, tmp_path):
    path, merged = files[adapter]
    out = tmp_path / f"{adapter}_r3.safetensors"
    la.extract(path, files["base"], rank=3, out=out, dtype=torch.float32, progress=False)
    model = sd.load(files["base"])
    lora.load(out, model.unet)
    for p, layer in lora.named_lora_layers(model.unet):
        u, s, vh = torch.linalg.svd(merged[p], full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(layer.lora_weight().double().flatten(1), best, rtol=1e-4, atol=1e-6)


def test_subspace_of_adapters_uses_the_update_and_intruders_run(files):
    base = la.load_base(files["base"])
    loha, lokr = la.load_run(files["loha"][0], base), la.load_run(files["lokr"][0], base, targets="attn")
    with pytest.raises(ValueError, match="needs two LoRAs"):
        la.subspace(loha, lokr, "A", common=True, progress=False)
    same = la.subspace(loha, loha, "auto", rank=2, progress=False)
    assert same.data["factor"] == "dW" and all(r["phi_min"] == pytest.approx(1.0) for r in same.rows)
    assert la.intruders([loha, lokr], progress=False).rows
