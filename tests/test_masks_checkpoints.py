import argparse
import copy

import pytest
import torch.nn.utils.prune  # noqa: F401 - imported for torch.nn.utils.prune below
import torch

from helpers import tiny_model
from utils.io.files import CheckpointError, save_pretrained_atomic
from utils.pipeline.identity import PruneSpec
from utils.pruning.cache import import_lineage_checkpoint, load_pruned_model
from utils.models.sparsity import sparsity_report
from utils.training.masks import MaskSet
from utils.models.loading import resolve_model
from utils.models.structure import prunable_linears
from utils.pruning.driver import prune_model


def _pruned_tiny(density=0.2):
    model = tiny_model("llama", 61)
    prune_model(model, "magnitude", density, progress=False)
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_masked_gradients_hold_pruned_weights_at_exactly_zero_through_adamw(fused):
    model = _pruned_tiny()
    zeros = {n: (l.weight == 0).clone() for n, l in prunable_linears(model).items()}
    masks = MaskSet.for_model(model)
    assert masks.names[0].endswith(".weight") and masks.keep[0].dtype == torch.bool
    unmasked = copy.deepcopy(model)
    model.train(), unmasked.train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused) for m in (model, unmasked)]
    for _ in range(3):
        batch = torch.randint(0, 61, (2, 16))
        for m, optimizer, masked in ((model, optimizers[0], True), (unmasked, optimizers[1], False)):
            m(input_ids=batch, labels=batch).loss.backward()
            if masked:
                masks.mask_gradients()
            optimizer.step()
            optimizer.zero_grad()
        assert masks.violations() == 0  # a zero weight with zero gradient stays exactly zero ...
    assert MaskSet.for_model(unmasked).kept_fraction() > 0.9  # ... and unmasked, AdamW moves them all
    for name, linear in prunable_linears(model).items():
        assert torch.all(linear.weight[zeros[name]] == 0)
        assert torch.all(linear.weight[~zeros[name]] != 0)
    assert masks.kept_fraction() == pytest.approx(0.2, abs=0.01)
    with torch.no_grad():  # apply() zeroes weights that were moved by something else
        for linear in prunable_linears(model).values():
            linear.weight.add_(1.0)
    assert masks.violations() > 0
    masks.apply()
    assert masks.violations() == 0 and masks.kept_fraction() == pytest.approx(0.2, abs=0.01)


def test_stale_moments_move_pruned_weights_until_the_optimizer_state_is_masked():
    model = _pruned_tiny()
    masks = MaskSet.for_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 61, (2, 16))

    def step(masked: bool) -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        if masked:
            masks.mask_gradients()
        optimizer.step()
        optimizer.zero_grad()

    step(masked=False)  # moments at pruned positions, as state saved by an unmasked run has them
    masks.apply()
    step(masked=True)
    assert masks.violations() > 0
    masks.apply()
    masks.mask_optimizer_state(optimizer)
    for _ in range(3):
        step(masked=True)
        assert masks.violations() == 0


def test_compiled_gradient_masking_and_clipping_equal_eager():
    model = _pruned_tiny()
    masks = MaskSet.for_model(model)
    batch = torch.randint(0, 61, (2, 16))
    results = {}
    for compiled in (False, True):
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        masks.mask_gradients(compiled=compiled)
        masked = [p.grad.clone() for p in masks.parameters]
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        unclipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad * m) for p, m in zip(
            masks.parameters, masks.keep)] + [torch.linalg.vector_norm(p.grad) for n, p in model.named_parameters()
                                             if n not in masks.names]))
        masks.mask_gradients(compiled=compiled)  # then clipping, as train_step does
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(unclipped) / 4)
        clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[compiled] = masked, clipped, float(unclipped)
    (masked, clipped, unclipped), (masked_c, clipped_c, _) = results[False], results[True]
    for eager, compiled, mask in zip(masked, masked_c, masks.keep):
        assert torch.equal(eager, compiled) and torch.all(eager[~mask] == 0) and eager.abs().sum() > 0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped_c.values()]))
    assert float(total) == pytest.approx(unclipped / 4, rel=1e-5)  # the norm of the masked gradients was clipped
    for name, eager in clipped.items():
        torch.testing.assert_close(clipped_c[name], eager, rtol=1e-5, atol=1e-9)
    for name, mask in zip(masks.names, masks.keep):
        assert torch.all(clipped_c[name][~mask] == 0) and torch.equal(clipped_c[name] != 0, masked_c[
            masks.names.index(name)] != 0)


def test_masks_in_the_compiled_backward_equal_masking_after_it_and_leave_the_model_as_it_was():
    model = _pruned_tiny()
    reference = copy.deepcopy(model)
    masks, reference_masks = MaskSet.for_model(model), MaskSet.for_model(reference)
    keys = list(model.state_dict())
    assert masks.mask_in_backward() and masks.in_backward
    assert list(model.state_dict()) == keys  # the mask buffers are not saved
    batch = torch.randint(0, 61, (2, 16))
    torch.compile(model)(input_ids=batch, labels=batch).loss.backward()
    reference(input_ids=batch, labels=batch).loss.backward()
    assert any(torch.any(p.grad[~m] != 0) for p, m in zip(reference_masks.parameters, reference_masks.keep))
    reference_masks.mask_gradients()
    masks.mask_gradients()  # masked in backward already: nothing to do
    for param, expected, mask in zip(masks.parameters, reference_masks.parameters, masks.keep):
        assert torch.all(param.grad[~mask] == 0) and param.grad.abs().sum() > 0
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-4, atol=1e-6)
    masks.release()
    assert not masks.in_backward and all(type(linear) is torch.nn.Linear and "gradient_mask" not in linear._buffers
                                         for linear in prunable_linears(model).values())
    assert not MaskSet({"w": torch.ones(2)}, {"w": torch.ones(2)}).mask_in_backward()  # no linear to put it in


def test_sparsity_report_measures():
    model = _pruned_tiny(0.2)
    report = sparsity_report(model)
    assert report.density == pytest.approx(0.2, abs=1e-3)
    assert report.lines()[0].startswith("Non-zero ratio per layer")
    assert "model.layers.1: 0.2000" in "\n".join(report.lines())


def test_pruned_checkpoint_round_trip_keeps_the_zeros(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    spec = PruneSpec("tiny", "0123456789abcdef", 0.1, "magnitude", None, "uniform", bos=False)
    folder = spec.folder(tmp_path / "pruned_models")
    assert folder.name == "tiny-0.1-magnitude-0123456789"
    assert PruneSpec("m", "ffffffffffff", 0.5, "wanda", (2, 4), "uniform", bos=False).folder("p").name == \
        "m-0.5-wanda-2of4-ffffffffff"
    assert PruneSpec("m", "ffffffffffff", 0.1, "sparsegpt", None, "owl-0.08-5", bos=True,
                     options=(("blocksize", 64),)).folder("p").name == \
        "m-0.1-sparsegpt-owl-0.08-5-bos-blocksize64-ffffffffff"
    prune_model(model, "magnitude", 0.1, progress=False)
    save_pretrained_atomic(model, tokenizer, folder, info=spec.to_json())
    loaded, _, saved_info = load_pruned_model(resolve_model(str(base)), folder)
    assert saved_info["method"] == "magnitude"
    for (name, a), (_, b) in zip(prunable_linears(model).items(), prunable_linears(loaded).items()):
        assert torch.equal(a.weight == 0, b.weight == 0), name
        assert torch.equal(a.weight, b.weight)


def test_corrupt_checkpoint_names_the_folder(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    folder = tmp_path / "pruned"
    prune_model(model, "magnitude", 0.5, progress=False)
    save_pretrained_atomic(model, tokenizer, folder, info={"method": "magnitude", "density": 0.5})
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=str(folder)):
        load_pruned_model(resolve_model(str(base)), folder)
    (folder / "pruning.json").unlink()
    with pytest.raises(CheckpointError, match="pruning.json is missing"):
        load_pruned_model(resolve_model(str(base)), folder)


def test_lineage_state_dicts_plain_and_from_torch_prune(tmp_path):
    source = _pruned_tiny(0.3)
    plain = tmp_path / "tiny-0.3.pt"
    torch.save(source.state_dict(), plain)
    target = tiny_model("llama", 61)  # the dense model the lineage file was pruned from
    assert not torch.equal(target.model.layers[0].mlp.up_proj.weight, source.model.layers[0].mlp.up_proj.weight)
    import_lineage_checkpoint(target, plain)
    assert torch.equal(target.model.layers[0].mlp.up_proj.weight, source.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(CheckpointError, match="was saved from another model: its input embeddings"):
        import_lineage_checkpoint(tiny_model("llama", 61, seed=1), plain)  # same shapes, another model

    reparametrized = tiny_model("llama", 61, seed=2)
    linear = reparametrized.model.layers[1].self_attn.q_proj
    torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.6)
    state = reparametrized.state_dict()
    assert "model.layers.1.self_attn.q_proj.weight_orig" in state
    path = tmp_path / "pruned-lineage.pt"
    torch.save(state, path)
    fresh = tiny_model("llama", 61, seed=2)
    import_lineage_checkpoint(fresh, path)
    kept = fresh.model.layers[1].self_attn.q_proj.weight != 0
    assert kept.float().mean().item() == pytest.approx(0.4, abs=0.01)


def test_bad_lineage_files_are_refused_with_the_file_name(tmp_path):
    model = tiny_model("llama", 61)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt.pt is not a readable state dict"):
        import_lineage_checkpoint(model, corrupt)
    other = tmp_path / "other.pt"
    torch.save(tiny_model("llama", 61, hidden=32).state_dict(), other)
    with pytest.raises(CheckpointError, match="other.pt does not match .*another shape"):
        import_lineage_checkpoint(model, other)
    pickled = tmp_path / "object.pt"
    torch.save({"weights": argparse.Namespace(code="would run on unpickling")}, pickled)
    with pytest.raises(CheckpointError, match="object.pt"):
        import_lineage_checkpoint(model, pickled)
    with pytest.raises(CheckpointError, match="not found"):
        import_lineage_checkpoint(model, tmp_path / "missing.pt")


def test_a_cache_entry_another_process_finished_first_is_kept_and_its_temporary_folder_left_alone(tmp_path):
    import json
    import os
    from utils.io.files import save_pretrained_atomic
    model = tiny_model("llama", 64, layers=1, hidden=16)
    folder = tmp_path / "entry"
    others = [tmp_path / "entry.tmp", tmp_path / f"entry.{os.getpid() + 1}.tmp"]  # a training state's, another process's
    for other in others:
        other.mkdir()
        (other / "part").write_text("being written")
    save_pretrained_atomic(model, None, folder, info={"who": "first"}, keep_existing=True)
    save_pretrained_atomic(model, None, folder, info={"who": "second"}, keep_existing=True)
    assert json.loads((folder / "pruning.json").read_text())["who"] == "first"
    save_pretrained_atomic(model, None, folder, info={"who": "third"})  # a best model: the new one replaces it
    assert json.loads((folder / "pruning.json").read_text())["who"] == "third"
    assert all((other / "part").read_text() == "being written" for other in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["entry", *(o.name for o in others)])
