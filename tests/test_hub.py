"""Tests for hub.py, model_card.py and reference_checkpoints.py: Hub artifacts and the published reference
checkpoints.

* Push and pull over real HTTP on 127.0.0.1 only: a Hub API server the tests start (tests/hub_server.py) and
  olah (a Hub mirror from PyPI) serving a local git repo. The client side runs in subprocesses
  (tests/hub_client.py) because HF_ENDPOINT / HF_HUB_OFFLINE must be set before huggingface_hub is imported;
  this process never sets them, so no other test is affected.
* Model cards, the base compatibility guard, `hf-hydra convert`.
* Synthesized checkpoints in each reference layout (method.md section 5: exact key names and shapes, tied
  duplicates, the extra embedding copy) load, and a hand-written forward of the reference equations
  (zankner/Hydra, FasterDecoding/Medusa) on the same tensors gives the same draft logits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_client import (
    BASE_REPO,
    CLI_REPO,
    HEADS_REPO,
    MAX_NEW_TOKENS,
    PROMPTS,
    REFERENCE_REPO,
    SAVE_PUSH_REPO,
    TOKEN,
    VOCAB,
    make_base_folder,
    randomize_heads,
    tiny_tokenizer,
)
from hub_server import HubServer
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

import hf_hydra  # noqa: F401  (registers model type "hydra" with the Auto classes)
from hf_hydra import HydraForCausalLM, cli, hub, model_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENT = Path(__file__).resolve().parent / "hub_client.py"
BENCHMARK = {
    "schema_version": 1,
    "machine": {"processor": "x86_64", "torch": "2.13.0", "transformers": "5.23.0", "torch_threads": 1,
                "device": "cpu"},
    "settings": {"methods": ["autoregressive", "hydra++"], "max_new_tokens": 64, "turn": 1, "num_prompts": 2},
    "summary": [
        {"method": "autoregressive", "tau": None, "tokens_per_second": 31.25, "speedup_median": 1.0,
         "speedup_total": 1.0, "mismatches": 0},
        {"method": "hydra++", "tau": 2.3456, "tokens_per_second": 51.5, "speedup_median": 1.6543,
         "speedup_total": 1.612, "mismatches": 0},
    ],
}
BENCHMARK["results"] = [{"method": "autoregressive", "question_id": 81, "new_tokens": 64}]  # per prompt: not shipped
SHIPPED_BENCHMARK = {key: value for key, value in BENCHMARK.items() if key != "results"}
HYDRA_PLUS_PLUS_ROW = "| hydra++ | 2.35 | 51.5 | 1.65x | 1.61x | 0 |"  # BENCHMARK's row, as the card prints it


# ==================================================================================================
# Helpers


def _run_client(scenario: str, workdir: Path, endpoint: str, offline: bool = False) -> None:
    """Run one scenario of hub_client.py with the Hub variables set for the child only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env |= {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(workdir / f"hf_home_{scenario}"),  # own token store and default cache
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    result = subprocess.run(
        [sys.executable, str(CLIENT), scenario, str(workdir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{scenario} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _local_base(workdir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(workdir / "base").eval()


def _heads_file(path: Path) -> dict[str, torch.Tensor]:
    """Heads tensors keyed like `model.heads.state_dict()` (a saved artifact prefixes them with `heads.`)."""
    return {k.removeprefix("heads."): v for k, v in load_file(path).items()}


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _speculative(model: HydraForCausalLM) -> list[list[int]]:
    return [
        model.generate(torch.tensor([p]), speculative=True, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].tolist()
        for p in PROMPTS
    ]


def _greedy(base: PreTrainedModel) -> list[list[int]]:
    return [base.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)[0].tolist()
            for p in PROMPTS]


# ==================================================================================================
# Push and pull through the real huggingface_hub client, against a Hub API server on 127.0.0.1


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, HubServer]:
    """push -> pull -> offline, each in its own process, against one server; the workdir holds what each did."""
    workdir = tmp_path_factory.mktemp("hub")
    (workdir / "bench.json").write_text(json.dumps(BENCHMARK))
    make_base_folder(workdir / "base")  # uploaded as BASE_REPO
    state = _hydra_state(_local_base(workdir), prefix_mlp=True)
    _write_hydra(workdir / "hydra_ref", BASE_REPO, state, "prefix-mlp")  # uploaded as REFERENCE_REPO
    with HubServer(tokens={TOKEN: "tester"}) as server:
        _run_client("push", workdir, server.url)
        _run_client("pull", workdir, server.url)
        _run_client("offline", workdir, server.url, offline=True)
    return workdir, server


def test_push_then_pull_is_bit_identical_and_generates_identically(published) -> None:
    workdir, _ = published
    _assert_same_tensors(_heads_file(workdir / "pulled_main.safetensors"), _heads_file(workdir / "ref_second" /
                                                                                        "model.safetensors"))
    _assert_same_tensors(_heads_file(workdir / "pulled_first.safetensors"), _heads_file(workdir / "ref_first" /
                                                                                         "model.safetensors"))
    base = _local_base(workdir)  # the same weights as the base the pulling process loaded from the server
    for name, reference in (("pulled_main", "ref_second"), ("pulled_first", "ref_first")):
        local = HydraForCausalLM.from_pretrained(workdir / reference, base_model=base)
        pulled = json.loads((workdir / f"{name}.json").read_text())["generated"]
        assert pulled == _speculative(local) == _greedy(base)


def test_pushed_repo_holds_heads_only_and_our_card(published) -> None:
    workdir, server = published
    shas = json.loads((workdir / "push.json").read_text())
    repo = server.state.repos[HEADS_REPO]
    assert repo.private
    first, second = repo.commits[shas["first"]], repo.commits[shas["second"]]
    assert set(first.files) == {".gitattributes", "README.md", "config.json", "generation_config.json",
                                "model.safetensors", "benchmark.json"}
    assert "model.safetensors" in first.lfs_paths  # went through the LFS batch + PUT flow
    assert json.loads(first.files["benchmark.json"]) == SHIPPED_BENCHMARK
    # Retrained heads pushed without a benchmark: the old measurement is gone, card and repo agree.
    assert "benchmark.json" not in second.files
    weights = workdir / "second.safetensors"
    weights.write_bytes(second.files["model.safetensors"])
    assert all(key.startswith("heads.") for key in load_file(weights))

    card = ModelCard(first.files["README.md"].decode())
    assert card.data.base_model == BASE_REPO
    assert card.data.library_name == "hf_hydra"
    assert card.data.pipeline_tag == "text-generation"
    assert {"speculative-decoding", "hydra-plus-plus"} <= set(card.data.tags)
    assert f'AutoModelForCausalLM.from_pretrained("{HEADS_REPO}")' in card.text
    assert HYDRA_PLUS_PLUS_ROW in card.text and "| autoregressive | - | 31.2 | 1.00x | 1.00x | 0 |" in card.text
    assert shas["base_sha"] in card.text and shas["recorded_fingerprint"] in card.text
    assert "Not measured yet" in server.state.file(HEADS_REPO, shas["second"], "README.md").decode()


def test_cli_push_uploads_only_the_artifact(published) -> None:
    workdir, server = published
    assert json.loads((workdir / "push.json").read_text())["cli_status"] == 0
    commit = server.state.repos[CLI_REPO].resolve("main")
    files = set(commit.files)
    assert files == {".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
                     "tree_tuning.json"}  # what lets `tune-tree` re-tune the tree elsewhere without the features
    assert "expected tau 1.50" in commit.files["README.md"].decode()
    assert not server.state.repos[CLI_REPO].private
    _assert_same_tensors(_heads_file(workdir / "pulled_cli.safetensors"), _heads_file(workdir / "ref_cli" /
                                                                                       "model.safetensors"))
    assert ModelCard(commit.files["README.md"].decode()).data.base_model == BASE_REPO
    # save_pretrained(..., push_to_hub=True) pushes after writing the card, so the card on the Hub is ours too.
    saved = server.state.repos[SAVE_PUSH_REPO].resolve("main")
    assert set(saved.files) == files - {"tree_tuning.json"}  # save_pretrained writes no tuning
    card = ModelCard(saved.files["README.md"].decode())
    assert card.data.library_name == "hf_hydra" and f'from_pretrained("{SAVE_PUSH_REPO}")' in card.text
    # `--revision` names a branch that does not exist yet: it is created from main, and main stays as it was.
    assert json.loads((workdir / "push.json").read_text())["branch_status"] == 0
    branch = server.state.repos[CLI_REPO].resolve("experiment")
    assert branch.parent == commit.sha and branch.files == commit.files


def test_config_records_the_base_commit_and_tokenizer_fingerprint(published) -> None:
    workdir, _ = published
    shas = json.loads((workdir / "push.json").read_text())
    assert shas["recorded_revision"] == shas["base_sha"]  # "main" resolved to the commit it pointed to
    assert shas["recorded_fingerprint"] == hub.tokenizer_fingerprint(tiny_tokenizer())
    config = json.loads((workdir / "pulled_main.json").read_text())["config"]
    assert config["model_type"] == "hydra" and config["base_model_name_or_path"] == BASE_REPO
    assert config["base_model_revision"] == shas["base_sha"]
    assert config["base_tokenizer_fingerprint"] == shas["recorded_fingerprint"]


def test_private_heads_need_the_token(published) -> None:
    workdir, _ = published
    no_token = json.loads((workdir / "pull.json").read_text())["no_token"]
    assert no_token["type"] == "OSError" and "token" in no_token["message"]


def test_base_at_another_revision_warns_naming_both(published) -> None:
    workdir, _ = published
    shas = json.loads((workdir / "push.json").read_text())
    warnings = json.loads((workdir / "pull.json").read_text())["warnings"]
    assert any(shas["base_sha"] in w and shas["later_base_sha"] in w for w in warnings), warnings


def test_offline_loads_from_the_cache_and_says_what_to_do_without_one(published) -> None:
    workdir, _ = published
    _assert_same_tensors(_heads_file(workdir / "offline.safetensors"), _heads_file(workdir / "ref_second" /
                                                                                    "model.safetensors"))
    errors = json.loads((workdir / "offline.json").read_text())
    explicit = errors["explicit"]
    assert explicit["type"] == "OSError"
    for words in ("HF_HUB_OFFLINE=1", HEADS_REPO, "empty_cache", "while online"):
        assert words in explicit["message"], explicit["message"]
    # Through the Auto classes transformers reads config.json before hf_hydra is involved: its own message.
    assert errors["auto"]["type"] == "OSError" and "offline mode" in errors["auto"]["message"]


def test_reference_checkpoint_loads_and_converts_from_the_hub(published) -> None:
    workdir, _ = published
    shas = json.loads((workdir / "push.json").read_text())
    local = HydraForCausalLM.from_pretrained(workdir / "hydra_ref", base_model=_local_base(workdir))
    expected = {f"heads.{k}": v for k, v in local.heads.state_dict().items()}
    _assert_same_tensors(load_file(workdir / "pulled_reference.safetensors"), expected)
    converted = workdir / "converted_reference"
    _assert_same_tensors(load_file(converted / "model.safetensors"), expected)
    config = json.loads((converted / "config.json").read_text())
    assert config["reference_checkpoint"] == {"source": REFERENCE_REPO, "format": "hydra-prefix-mlp"}
    assert config["base_model_name_or_path"] == BASE_REPO
    assert config["base_model_revision"] == shas["later_base_sha"]  # the base it was converted against
    assert config["base_tokenizer_fingerprint"] == hub.tokenizer_fingerprint(tiny_tokenizer())


# ==================================================================================================
# Pull through olah (a Hub mirror from PyPI) serving a local git repo of an artifact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"olah exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"olah did not listen on port {port} within {timeout} s")


def _git_repo_of(folder: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "."], ["git", "commit", "-q", "-m", "heads"]):
        subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)


def test_pull_through_olah_mirror(tmp_path: Path) -> None:
    """olah is in the `test` extra; a local git repo of the artifact is all it serves (offline mirror)."""
    make_base_folder(tmp_path / "base")
    base = _local_base(tmp_path)
    model = HydraForCausalLM.from_base(base, head_arch="hydra", num_heads=3)
    randomize_heads(model, seed=3)
    repo = tmp_path / "mirrors" / "models" / "org" / "mirrored-heads"
    model.save_pretrained(repo)
    _git_repo_of(repo)

    port = _free_port()
    config = tmp_path / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{tmp_path / "olah_repos"}"\n'
        f'mirrors-path = ["{tmp_path / "mirrors"}"]\nmirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\n\n[accessibility]\noffline = true\n'
    )
    log = (tmp_path / "olah.log").open("w")
    olah = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(tmp_path / "olah_logs")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_port(port, olah)
        _run_client("mirror", tmp_path, f"http://127.0.0.1:{port}")
    finally:
        olah.terminate()
        olah.wait(timeout=30)
        log.close()
    _assert_same_tensors(_heads_file(tmp_path / "mirrored.safetensors"), _heads_file(repo / "model.safetensors"))
    assert json.loads((tmp_path / "mirrored.json").read_text())["generated"] == _speculative(model)


# ==================================================================================================
# Model card, compatibility guard (local folders, no HTTP)


def test_card_is_generated_from_the_json_beside_the_heads(tmp_path: Path) -> None:
    make_base_folder(tmp_path / "base")
    model = HydraForCausalLM.from_base(_local_base(tmp_path), head_arch="medusa", num_heads=2)
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "training_args.json").write_text(json.dumps({"features_dir": "/secret/features", "lr": 0.0005,
                                                          "epochs": 10.0, "head_arch": "medusa"}))
    (heads / "training_summary.json").write_text(json.dumps({"steps": 120, "tokens": 45000, "num_processes": 1,
                                                             "validation": {"top1": [0.5612, 0.3201]}}))
    prepare = "hf-hydra prepare --data distilled.jsonl --out features/sharegpt --max-length 512 --teacher-topk 32"
    (heads / "preparation.json").write_text(json.dumps({"command": prepare}))
    (tmp_path / "bench.json").write_text(json.dumps(BENCHMARK))
    model.save_pretrained(heads, benchmark=tmp_path / "bench.json")

    assert json.loads((heads / "benchmark.json").read_text()) == SHIPPED_BENCHMARK
    card = ModelCard((heads / "README.md").read_text())
    assert card.data.base_model is None  # a local folder is no Hub id
    assert card.data.library_name == "hf_hydra" and "medusa" in card.data.tags
    assert "| lr | `0.0005` |" in card.text and "| epochs | `10.0` |" in card.text
    assert "/secret/features" not in card.text  # local paths stay local
    train_command = (
        "hf-hydra train --features-dir features/sharegpt --output-dir heads/ --lr 0.0005 --epochs 10.0 "
        "--head-arch medusa"
    )
    assert f"{prepare}\n{train_command}\n" in card.text  # the reproduce commands
    assert "120 optimizer steps over 45,000 tokens" in card.text and "0.561, 0.320" in card.text
    assert HYDRA_PLUS_PLUS_ROW in card.text
    assert f"| parameters (heads only) | {sum(p.numel() for p in model.heads.parameters()):,} |" in card.text
    # Saving again without a benchmark keeps the one beside the heads.
    model.save_pretrained(heads)
    assert HYDRA_PLUS_PLUS_ROW in (heads / "README.md").read_text()


def test_reproduce_command_in_the_card_gives_the_same_training_arguments() -> None:
    from hf_hydra.training.arguments import TrainingArguments

    args = TrainingArguments(
        features_dir="/secret/features", output_dir="/secret/heads", base_model="org/base", head_arch="hydra++",
        vocab_projection="shared_draft_vocab", lr=5e-4, epochs=2.5, dropout=0.2, noise_alpha=5.0, save_every=7,
        save_dtype="bfloat16", tree="chain-3", extra_features_dirs=("/secret/raw", "/secret/more"),
    )
    command = model_card._train_command(dataclasses.asdict(args), "features/", ["features/raw", "features/more"])
    parsed = cli.build_parser().parse_args(shlex.split(command)[1:])
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    again = TrainingArguments(**{k: v for k, v in vars(parsed).items() if k in names and v is not None})
    shown = {"features_dir": "features/", "output_dir": "heads/", "save_every": TrainingArguments.save_every,
             "extra_features_dirs": ("features/raw", "features/more")}
    assert again == dataclasses.replace(args, **shown)


def test_reproduce_command_of_a_two_process_run_launches_two_processes() -> None:
    from hf_hydra.training.arguments import TrainingArguments

    args = TrainingArguments(
        features_dir="/secret/features", output_dir="/secret/heads", base_model="org/base", batch_size=8
    )
    command = shlex.split(model_card._train_command(dataclasses.asdict(args), "features/", [], num_processes=2))
    # batch_size is per process: on one process the same arguments would halve the batch.
    assert command[:7] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "hf_hydra.cli"]
    parsed = cli.build_parser().parse_args(command[7:])
    assert parsed.command == "train" and parsed.batch_size == 8 and parsed.features_dir == "features/"


def test_benchmark_json_of_another_kind_is_a_value_error(tmp_path: Path) -> None:
    make_base_folder(tmp_path / "base")
    model = HydraForCausalLM.from_base(_local_base(tmp_path), head_arch="hydra", num_heads=2)
    (tmp_path / "bench.json").write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="hf-hydra bench"):
        model.save_pretrained(tmp_path / "heads", benchmark=tmp_path / "bench.json")


def test_other_tokenizer_warns_naming_both_fingerprints(tmp_path: Path, caplog) -> None:
    make_base_folder(tmp_path / "base")
    make_base_folder(tmp_path / "shifted", tokenizer_shift=1)  # same weights, other token -> id map
    model = HydraForCausalLM.from_base(_local_base(tmp_path), head_arch="hydra", num_heads=2)
    recorded = model.config.base_tokenizer_fingerprint
    assert recorded == hub.tokenizer_fingerprint(tiny_tokenizer())
    model.save_pretrained(tmp_path / "heads")

    with caplog.at_level(logging.WARNING, logger="hf_hydra"):
        HydraForCausalLM.from_pretrained(tmp_path / "heads", base_model=_local_base(tmp_path))
    assert not caplog.records
    shifted = AutoModelForCausalLM.from_pretrained(tmp_path / "shifted")
    with caplog.at_level(logging.WARNING, logger="hf_hydra"):
        HydraForCausalLM.from_pretrained(tmp_path / "heads", base_model=shifted)
    other = hub.tokenizer_fingerprint(tiny_tokenizer(1))
    assert any(recorded in r.getMessage() and other in r.getMessage() for r in caplog.records), caplog.text


# ==================================================================================================
# Reference checkpoints: synthesized in the published layouts (method.md section 5)

NUM_HEADS = 3
NUM_LAYERS = 3  # blocks 1..2 (Hydra) / 0..2 (Medusa) are one tied module in the reference code
STORED_DTYPE = torch.float16  # the published checkpoints are half precision


def _tensor(generator: torch.Generator, *shape: int, scale: float = 0.1, shift: float = 0.0) -> torch.Tensor:
    return (shift + scale * torch.randn(*shape, generator=generator)).to(STORED_DTYPE)


def _hydra_state(base: PreTrainedModel, prefix_mlp: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict `HydraModel.hydra_head.state_dict()` of zankner/Hydra saves (hydra_lm_head.pt)."""
    g = torch.Generator().manual_seed(seed)
    config = base.config
    d, heads_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    first, step = (1, 2) if prefix_mlp else (0, 1)  # prefix-mlp: nn.Sequential(Dropout, block, Dropout, block, ...)
    state = {}
    for i in range(NUM_HEADS):
        width = d * (i + 2)
        state |= {f"hydra_mlp.{i}.{first}.linear.weight": _tensor(g, d, width),
                  f"hydra_mlp.{i}.{first}.linear.bias": _tensor(g, d),
                  f"hydra_mlp.{i}.{first}.res_connection.weight": _tensor(g, d, width),
                  f"hydra_mlp.{i}.{first}.res_connection.bias": _tensor(g, d)}
        tied_weight, tied_bias = _tensor(g, d, d), _tensor(g, d)  # `[ResBlock(d)] * (L - 1)`: one module
        for k in range(1, NUM_LAYERS):
            state[f"hydra_mlp.{i}.{first + step * k}.linear.weight"] = tied_weight
            state[f"hydra_mlp.{i}.{first + step * k}.linear.bias"] = tied_bias
        output = f"hydra_lm_head.{i}.1" if prefix_mlp else f"hydra_lm_head.{i}"
        state |= {f"{output}.weight": _tensor(g, VOCAB, d), f"{output}.bias": _tensor(g, VOCAB)}
    state["input_embed_fn.weight"] = base.get_input_embeddings().weight.detach().to(STORED_DTYPE).clone()
    if prefix_mlp:  # a 1-layer LlamaModel of the base config
        q, kv, inter = config.num_attention_heads * heads_dim, config.num_key_value_heads * heads_dim, 128
        layer = "prefix_embeding_layer.layers.0."
        state |= {
            "prefix_embeding_layer.embed_tokens.weight": _tensor(g, VOCAB, d),
            layer + "self_attn.q_proj.weight": _tensor(g, q, d),
            layer + "self_attn.k_proj.weight": _tensor(g, kv, d),
            layer + "self_attn.v_proj.weight": _tensor(g, kv, d),
            layer + "self_attn.o_proj.weight": _tensor(g, d, q),
            layer + "self_attn.rotary_emb.inv_freq": _reference_inv_freq(heads_dim).to(STORED_DTYPE),
            layer + "mlp.gate_proj.weight": _tensor(g, inter, d),
            layer + "mlp.up_proj.weight": _tensor(g, inter, d),
            layer + "mlp.down_proj.weight": _tensor(g, d, inter),
            layer + "input_layernorm.weight": _tensor(g, d, shift=1.0),
            layer + "post_attention_layernorm.weight": _tensor(g, d, shift=1.0),
            "prefix_embeding_layer.norm.weight": _tensor(g, d, shift=1.0),
        }
    return state


def _medusa_state(version2: bool, layers: int = 1, num_heads: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """`medusa_head.state_dict()` of FasterDecoding/Medusa: heads nn.Sequential([ResBlock] * L, Linear)."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    state = {}
    for i in range(num_heads):
        weight, bias = _tensor(g, d, d), _tensor(g, d)  # one ResBlock module repeated L times
        for k in range(layers):
            state |= {f"{i}.{k}.linear.weight": weight, f"{i}.{k}.linear.bias": bias}
        if not version2:
            state[f"{i}.{layers}.weight"] = _tensor(g, VOCAB, d)
    return state


def _reference_inv_freq(heads_dim: int) -> torch.Tensor:
    """RoPE frequencies of the reference LlamaRotaryEmbedding (base 10000), float32 as at its construction."""
    return 1.0 / (10000 ** (torch.arange(0, heads_dim, 2).float() / heads_dim))


def _write_hydra(folder: Path, base_dir: Path | str, state: dict, arch: str, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": str(base_dir), "grounded_heads": True, "hidden_state_offset": 0,
        "hydra_head_arch": arch, "hydra_num_heads": NUM_HEADS, "hydra_num_layers": NUM_LAYERS,
        "transformers_version": "4.33.2", **config,
    }))
    torch.save(state, folder / "hydra_lm_head.pt")
    return folder


def _write_medusa(folder: Path, base_dir: Path, state: dict, safetensors: bool, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": str(base_dir), "medusa_num_heads": 2, "medusa_num_layers": 1,
        "transformers_version": "4.33.2", **config,
    }))
    if safetensors:
        save_file(state, str(folder / "medusa_lm_head.safetensors"))
    else:
        torch.save(state, folder / "medusa_lm_head.pt")
    return folder


@pytest.fixture
def vicuna(tmp_path: Path) -> tuple[Path, PreTrainedModel]:
    """A tiny base saved to a folder, standing in for lmsys/vicuna-*-v1.3."""
    make_base_folder(tmp_path / "vicuna")
    return tmp_path / "vicuna", AutoModelForCausalLM.from_pretrained(tmp_path / "vicuna").eval()


# ---- the reference equations, written out on the reference tensors (by their reference names)


def _linear(x: torch.Tensor, state: dict, name: str, bias: bool = True) -> torch.Tensor:
    return F.linear(x, state[f"{name}.weight"].float(), state[f"{name}.bias"].float() if bias else None)


def _reference_hydra_head(state: dict, prefix_mlp: bool, i: int, context: torch.Tensor,
                          path_embeds: list[torch.Tensor]) -> torch.Tensor:
    """zankner/Hydra grounded head i: x = cat(h, E(x_{t+1}), ..., E(x_{t+i+1})); res_connection(x) + SiLU(W x + b);
    then ResBlocks x + SiLU(W x + b); then Linear(d, V) with bias. (Dropout: identity at inference.)"""
    first, step = (1, 2) if prefix_mlp else (0, 1)
    x = torch.cat([context, *path_embeds], dim=-1)
    block = f"hydra_mlp.{i}.{first}"
    x = _linear(x, state, f"{block}.res_connection") + F.silu(_linear(x, state, f"{block}.linear"))
    for k in range(1, NUM_LAYERS):
        x = x + F.silu(_linear(x, state, f"hydra_mlp.{i}.{first + step * k}.linear"))
    return _linear(x, state, f"hydra_lm_head.{i}.1" if prefix_mlp else f"hydra_lm_head.{i}")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _reference_prefix_layer(state: dict, hidden: torch.Tensor, config) -> torch.Tensor:
    """zankner/Hydra's prefix_embeding_layer: a 1-layer LlamaModel run on `inputs_embeds` = the base's post-norm
    hidden states (T, d) at positions 0..T-1, causal; its output is after the final norm (LlamaModel [0])."""
    p, eps = "prefix_embeding_layer.layers.0.", config.rms_norm_eps
    seq, d = hidden.shape
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    heads_dim = d // n_heads
    x = _rms_norm(hidden, state[p + "input_layernorm.weight"], eps)
    q = _linear(x, state, p + "self_attn.q_proj", bias=False).view(seq, n_heads, heads_dim).transpose(0, 1)
    k = _linear(x, state, p + "self_attn.k_proj", bias=False).view(seq, n_kv, heads_dim).transpose(0, 1)
    v = _linear(x, state, p + "self_attn.v_proj", bias=False).view(seq, n_kv, heads_dim).transpose(0, 1)
    # The reference builds its cos/sin cache at construction from float32 frequencies (base 10000); the stored
    # inv_freq buffer is only checked against ours.
    angles = torch.outer(torch.arange(seq).float(), _reference_inv_freq(heads_dim))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(n_heads // n_kv, dim=0), v.repeat_interleave(n_heads // n_kv, dim=0)  # repeat_kv
    scores = q @ k.transpose(-1, -2) / math.sqrt(heads_dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    attention = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, d)
    h = hidden + _linear(attention, state, p + "self_attn.o_proj", bias=False)
    y = _rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
    mlp = F.silu(_linear(y, state, p + "mlp.gate_proj", bias=False)) * _linear(y, state, p + "mlp.up_proj", bias=False)
    h = h + _linear(mlp, state, p + "mlp.down_proj", bias=False)
    return _rms_norm(h, state["prefix_embeding_layer.norm.weight"], eps)


def _reference_medusa_head(state: dict, i: int, layers: int, hidden: torch.Tensor, lm_head: torch.Tensor | None):
    """FasterDecoding/Medusa head i: L x ResBlock x + SiLU(W x + b) on h_t, then its own Linear(d, V, bias=False),
    or ("version 2") the base lm_head."""
    x = hidden
    for k in range(layers):
        x = x + F.silu(_linear(x, state, f"{i}.{k}.linear"))
    return F.linear(x, lm_head) if lm_head is not None else _linear(x, state, f"{i}.{layers}", bias=False)


def _base_hidden(base: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return base(torch.tensor([tokens]), output_hidden_states=True).hidden_states[-1][0]  # (T, d), post-norm


SEQUENCE = [3, 17, 9, 25, 0, 12, 30, 7]
PATH = [21, 4, 11]  # the base token and two drafted tokens on one tree path


@pytest.mark.parametrize("arch", ["prefix-mlp", "mlp"])
def test_reference_hydra_checkpoint_computes_the_reference_equations(tmp_path: Path, vicuna, arch: str) -> None:
    base_dir, base = vicuna
    prefix_mlp = arch == "prefix-mlp"
    state = _hydra_state(base, prefix_mlp)
    folder = _write_hydra(tmp_path / "hydra-vicuna", base_dir, state, arch)
    # the base from the reference config, as the reference does; float32 heads (packed ones draft in bfloat16)
    model = HydraForCausalLM.from_pretrained(folder, prepack=False)
    assert model.config.head_arch == ("hydra++" if prefix_mlp else "hydra")
    assert (model.config.num_heads, model.config.num_layers) == (NUM_HEADS, NUM_LAYERS)

    with torch.no_grad():
        hidden = _base_hidden(model.base_lm, SEQUENCE)
        reference_context = _reference_prefix_layer(state, hidden, base.config) if prefix_mlp else hidden
        positions = torch.arange(len(SEQUENCE))[None]
        context = model.heads.encode_context(hidden[None], positions, None)[0]  # (T, d)
        torch.testing.assert_close(context, reference_context, atol=2e-5, rtol=1e-4)
        embed = model.base_lm.get_input_embeddings()
        path_embeds = embed(torch.tensor(PATH))  # (3, d)
        for i in range(NUM_HEADS):
            for t in (0, len(SEQUENCE) - 1):
                ours = model.heads(i, context[t], path_embeds[: i + 1])
                expected = _reference_hydra_head(state, prefix_mlp, i, reference_context[t], list(path_embeds[: i + 1]))
                torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("version2", "safetensors", "layers"), [(False, False, 1), (False, True, 1), (True, False, 2)])
def test_reference_medusa_checkpoint_computes_the_reference_equations(
    tmp_path: Path, vicuna, version2: bool, safetensors: bool, layers: int
) -> None:
    base_dir, base = vicuna
    state = _medusa_state(version2, layers=layers, num_heads=3 if version2 else 5)
    extra = {"version": "2", "medusa_num_heads": 3, "medusa_num_layers": layers} if version2 else {}
    folder = _write_medusa(tmp_path / "medusa-vicuna", base_dir, state, safetensors, **extra)
    model = HydraForCausalLM.from_pretrained(folder, base_model=base)
    # Version 1: the config says 2 heads, the file holds 5 (the reference loader hard-codes 5).
    assert model.config.num_heads == (3 if version2 else 5)
    assert model.config.vocab_projection == ("shared" if version2 else "per_head")
    lm_head = base.get_output_embeddings().weight.detach() if version2 else None
    with torch.no_grad():
        hidden = _base_hidden(base, SEQUENCE)
        for i in range(model.config.num_heads):
            torch.testing.assert_close(
                model.heads(i, hidden), _reference_medusa_head(state, i, layers, hidden, lm_head), atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("layout", ["hydra-prefix-mlp", "hydra-mlp", "medusa", "medusa-v2"])
def test_reference_checkpoints_decode_losslessly(tmp_path: Path, vicuna, layout: str) -> None:
    base_dir, base = vicuna
    if layout.startswith("hydra"):
        arch = layout.removeprefix("hydra-")
        folder = _write_hydra(tmp_path / "ref", base_dir, _hydra_state(base, arch == "prefix-mlp"), arch)
    else:
        version2 = layout == "medusa-v2"
        extra = {"version": "2", "medusa_num_heads": 5} if version2 else {}
        folder = _write_medusa(tmp_path / "ref", base_dir, _medusa_state(version2), safetensors=False, **extra)
    model = HydraForCausalLM.from_pretrained(folder, base_model=base)
    assert _speculative(model) == _greedy(base)


def test_convert_writes_our_format(tmp_path: Path, vicuna) -> None:
    base_dir, base = vicuna
    source = _write_hydra(tmp_path / "hydra-vicuna", base_dir, _hydra_state(base, True), "prefix-mlp")
    assert cli.main(["convert", str(source), str(tmp_path / "converted")]) == 0

    converted = tmp_path / "converted"
    assert {p.name for p in converted.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                     "README.md"}
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "hydra" and config["head_arch"] == "hydra++"
    assert config["base_model_name_or_path"] == str(base_dir)
    assert config["reference_checkpoint"] == {"source": str(source), "format": "hydra-prefix-mlp"}
    assert config["base_tokenizer_fingerprint"] == hub.tokenizer_fingerprint(tiny_tokenizer())
    assert "converted from" in (converted / "README.md").read_text()
    reference = HydraForCausalLM.from_pretrained(source, base_model=base)
    loaded = AutoModelForCausalLM.from_pretrained(converted)
    _assert_same_tensors(loaded.heads.state_dict(), reference.heads.state_dict())
    assert _speculative(loaded) == _speculative(reference)


# ---- what must not load


def _hydra_folder(tmp_path: Path, vicuna, edit=None, **config) -> Path:
    base_dir, base = vicuna
    state = _hydra_state(base, prefix_mlp=True)
    if edit is not None:
        edit(state)
    return _write_hydra(tmp_path / "bad", base_dir, state, config.pop("arch", "prefix-mlp"), **config)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.__setitem__("hydra_mlp.0.9.linear.weight", s["hydra_mlp.0.3.linear.weight"]),
         r"unknown keys \['hydra_mlp.0.9.linear.weight'\]"),
        (lambda s: s.pop("hydra_lm_head.1.1.bias"), r"missing keys \['hydra_lm_head.1.1.bias'\]"),
        (lambda s: s.pop("prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"), r"missing keys .*inv_freq"),
        (lambda s: s.__setitem__("hydra_mlp.2.5.linear.weight", s["hydra_mlp.2.5.linear.weight"] + 1),
         "ties them"),
        (lambda s: s.__setitem__("input_embed_fn.weight", s["input_embed_fn.weight"] + 0.5), "input_embed_fn.weight"),
        (lambda s: s.__setitem__("prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq",
                                 s["prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"] * 2), "RoPE"),
        (lambda s: s.__setitem__("hydra_mlp.1.1.res_connection.weight", s["hydra_mlp.1.1.linear.weight"][:, :64]),
         r"wrong shape.*hydra_mlp.1.1.res_connection.weight \(64, 64\) \(expected \(64, 192\)\)"),
    ],
)
def test_bad_reference_checkpoints_are_value_errors(tmp_path: Path, vicuna, edit, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HydraForCausalLM.from_pretrained(_hydra_folder(tmp_path, vicuna, edit), base_model=vicuna[1])


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"arch": "cross-attn"}, "only 'mlp'"),
        ({"grounded_heads": False}, "grounded_heads=false"),
        ({"hidden_state_offset": 1}, "hidden_state_offset=1"),
    ],
)
def test_reference_variants_without_a_counterpart_are_refused(tmp_path: Path, vicuna, config: dict, match: str):
    with pytest.raises(ValueError, match=match):
        HydraForCausalLM.from_pretrained(_hydra_folder(tmp_path, vicuna, **config), base_model=vicuna[1])


class _Touch:
    """An object whose unpickling would create a file: torch.load(weights_only=True) must refuse it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickles_are_read_with_weights_only(tmp_path: Path, vicuna) -> None:
    marker = tmp_path / "code_ran"
    state = _hydra_state(vicuna[1], prefix_mlp=True)
    folder = _write_hydra(tmp_path / "evil", vicuna[0], {**state, "payload": _Touch(marker)}, "prefix-mlp")
    with pytest.raises(ValueError, match="weights_only=True"):
        HydraForCausalLM.from_pretrained(folder, base_model=vicuna[1])
    assert not marker.exists()
    torch.load(folder / "hydra_lm_head.pt", weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()


def test_medusa_file_missing_a_head_output_lists_it(tmp_path: Path, vicuna) -> None:
    state = _medusa_state(version2=False)
    del state["3.1.weight"]
    folder = _write_medusa(tmp_path / "medusa", vicuna[0], state, safetensors=True)
    with pytest.raises(ValueError, match=r"missing keys \['3.1.weight'\]"):
        HydraForCausalLM.from_pretrained(folder, base_model=vicuna[1])


@pytest.mark.parametrize(
    ("config", "match"), [({"model_type": "llama"}, "load it as the base model"), ({"foo": 1}, "neither")]
)
def test_foreign_configs_are_value_errors(tmp_path: Path, config: dict, match: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        HydraForCausalLM.from_pretrained(tmp_path)
