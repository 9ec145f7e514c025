"""A model folder's own code never runs unless ``model.trust_remote_code=true``, and nothing asks on stdin.

The fixture is a transformers folder whose ``tokenizer_config.json`` maps ``AutoTokenizer`` to a
class in ``custom_tok.py``; importing that file creates a marker file. With the default
(``trust_remote_code=false``) every loader fails with a clear ``ModelLoadError`` and the marker
stays absent, also when stdin answers ``y`` to transformers' "run the custom code?" prompt; with
``true`` the code is used. The trainers' tokenizer load takes the whole model section
(``gguf_file``, ``trust_remote_code``, ``revision``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.errors import ModelLoadError
from alignkit.models import load as model_load
from alignkit.models.tiny import TINY_TOKENIZER_DIR

ROOT = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def custom_folder(tmp_path):
    folder = tmp_path / "custom_model"
    shutil.copytree(TINY_TOKENIZER_DIR, folder)
    marker = tmp_path / "CODE_RAN"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": ["custom_tok.CustomTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "custom_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}))
    return folder, marker


def _clear(message: str) -> bool:
    return "needs custom code from its folder" in message and "model.trust_remote_code=true" in message


@pytest.mark.parametrize("loader", ["load_tokenizer_for", "load_tokenizer", "load_causal_lm", "load_reward_model"])
def test_custom_code_is_refused_by_default(custom_folder, loader):
    folder, marker = custom_folder
    call = {
        "load_tokenizer_for": lambda: model_load.load_tokenizer_for({"name_or_path": str(folder)}),
        "load_tokenizer": lambda: model_load.load_tokenizer(str(folder)),
        "load_causal_lm": lambda: model_load.load_causal_lm({"name_or_path": str(folder)}),
        "load_reward_model": lambda: model_load.load_reward_model({"name_or_path": str(folder)}),
    }[loader]
    with pytest.raises(ModelLoadError) as error:
        call()
    assert _clear(str(error.value)), str(error.value)
    assert str(folder) in str(error.value)
    assert not marker.exists(), "the folder's code ran"


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", COLUMNS="1000",
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"))  # where transformers would copy trusted code
    return env


def test_a_yes_on_stdin_does_not_run_the_code_in_a_training_run(custom_folder, tmp_path):
    """The trainers' first tokenizer load used to pass no trust_remote_code, so transformers asked."""
    folder, marker = custom_folder
    proc = subprocess.run([sys.executable, "-m", "alignkit", "train", "recipe=sft_tiny",
                           f"model.name_or_path={folder}", f"output_dir={tmp_path / 'runs'}", "run_name=r"],
                          input="y\ny\ny\n", capture_output=True, text=True, env=_env(tmp_path), timeout=600, cwd=ROOT)
    text = " ".join(proc.stderr.split())
    assert not marker.exists(), "a 'y' on stdin ran the folder's code"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[y/N]" not in proc.stdout + proc.stderr
    assert _clear(text), text[-2000:]


def test_trust_remote_code_true_is_passed_through(custom_folder, tmp_path):
    folder, marker = custom_folder
    script = ("from alignkit.models.load import load_tokenizer_for; "
              f"t = load_tokenizer_for({{'name_or_path': {str(folder)!r}, 'trust_remote_code': True}}); "
              "print(type(t).__name__)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "CustomTokenizer" and marker.exists()


def test_the_model_section_reaches_transformers(tmp_path, monkeypatch):
    """gguf_file, trust_remote_code and revision (hub ids) all reach AutoTokenizer; trust is never None."""
    import transformers

    seen: list[tuple[str, dict]] = []
    tiny = model_load.load_tokenizer("tiny")

    def fake(location, **kwargs):
        seen.append((location, kwargs))
        return tiny

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    model_load.load_tokenizer_for({"name_or_path": "org/model", "revision": "abc123"})
    (tmp_path / "m.gguf").write_bytes(b"")
    model_load.load_tokenizer_for({"name_or_path": str(tmp_path), "gguf_file": "m.gguf", "trust_remote_code": True})
    model_load.load_tokenizer(str(tmp_path / "m.gguf"))
    assert seen[0] == ("org/model", {"trust_remote_code": False, "revision": "abc123"})
    assert seen[1] == (str(tmp_path), {"trust_remote_code": True, "gguf_file": "m.gguf"})
    assert seen[2] == (str(tmp_path), {"trust_remote_code": False, "gguf_file": "m.gguf"})


def test_no_trainer_loads_a_tokenizer_by_name_alone():
    pattern = re.compile(r"load_tokenizer\(cfg\.model\.name_or_path|AutoTokenizer\.from_pretrained|AutoConfig\.from_pretrained\((?![^)]*trust_remote_code)")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "alignkit").rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and p.name not in ("load.py", "tiny.py", "smollm2.py", "plan.py")]
    assert offenders == []


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("loader", ["load_causal_lm", "load_reward_model"])
def test_pickle_weights_with_a_payload_are_refused_and_the_message_never_suggests_weights_only_false(
        custom_folder, tmp_path, loader):
    """transformers reads pytorch_model.bin with torch.load(weights_only=True): a payload is refused, and the
    message says so in alignkit's words instead of torch's advice to retry with weights_only=False."""
    import torch

    folder, _ = custom_folder
    (folder / "tokenizer_config.json").write_text((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    (folder / "custom_tok.py").unlink()
    marker = tmp_path / "PICKLE_RAN"
    torch.save({"model.embed_tokens.weight": torch.zeros(64, 16), "planted": _Payload(marker)},
               folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as error:
        getattr(model_load, loader)({"name_or_path": str(folder)})
    message = str(error.value)
    assert "nothing in it ran" in message and "Do not load it with weights_only=False" in message, message
    assert "will likely succeed" not in message, message
    assert not marker.exists()
