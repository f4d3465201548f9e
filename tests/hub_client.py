"""Client side of the Hub tests: `python tests/hub_client.py SCENARIO WORKDIR`.

Run in a subprocess because huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is
imported: tests/test_hub.py starts the server (tests/hub_server.py, or olah), sets those variables for the
child only, and checks the files each scenario leaves in WORKDIR. The helpers at the top are shared with
test_hub.py (importing them imports nothing that reads those variables differently).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import make_tiny_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast  # noqa: E402

import hf_hydra  # noqa: E402, F401  (registers model type "hydra" with the Auto classes)
from hf_hydra import HydraForCausalLM  # noqa: E402

TOKEN = "hf_test_write_token"  # the only token the test server knows
BASE_REPO = "org/tiny-base"
HEADS_REPO = "org/tiny-heads"  # private: pulling needs the token
CLI_REPO = "org/tiny-heads-cli"
SAVE_PUSH_REPO = "org/tiny-heads-save"  # save_pretrained(..., push_to_hub=True)
REFERENCE_REPO = "org/hydra-tiny-base"  # a checkpoint in the reference Hydra layout (hydra_lm_head.pt)
VOCAB = 32
PROMPTS = ([1, 5, 9, 3], [7, 7, 2, 30, 11, 4], [0, 1, 2])
MAX_NEW_TOKENS = 12


# ------------------------------------------------------------------------------------------------ helpers


def tiny_tokenizer(shift: int = 0) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB words; `shift` rotates which id each word gets (another tokenizer)."""
    vocab = {f"w{(i + shift) % VOCAB}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")))


def make_base_folder(folder: Path, tokenizer_shift: int = 0) -> None:
    """A tiny seeded Llama base with a tokenizer, saved like a Hub model repo (stands in for vicuna)."""
    make_tiny_model("llama", seed=0, vocab_size=VOCAB).save_pretrained(folder)
    tiny_tokenizer(tokenizer_shift).save_pretrained(folder)


def randomize_heads(model: HydraForCausalLM, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.heads.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def speculative_outputs(model: HydraForCausalLM) -> list[list[int]]:
    return [
        model.generate(torch.tensor([p]), speculative=True, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].tolist()
        for p in PROMPTS
    ]


def save_heads(model: HydraForCausalLM, path: Path) -> None:
    """The heads' tensors keyed as in a saved artifact's model.safetensors."""
    save_file({f"heads.{k}": v.contiguous() for k, v in model.heads.state_dict().items()}, str(path))


def _pull(workdir: Path, name: str, repo: str, **kwargs) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(repo, **kwargs)
    assert isinstance(model, HydraForCausalLM), type(model)
    save_heads(model, workdir / f"{name}.safetensors")
    (workdir / f"{name}.json").write_text(json.dumps({"generated": speculative_outputs(model),
                                                      "config": model.config.to_dict()}))
    return model


def _error(call) -> dict:
    try:
        call()
    except Exception as error:  # the test checks which error a user gets and what it says
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


# ------------------------------------------------------------------------------------------------ scenarios


def push(workdir: Path) -> None:
    """Publish the tiny base in WORKDIR/base (two commits), heads on it (two commits), a saved folder through
    `hf-hydra push` and save_pretrained(push_to_hub=True), and the reference checkpoint in WORKDIR/hydra_ref."""
    from huggingface_hub import HfApi

    from hf_hydra import cli

    api = HfApi(token=TOKEN)
    api.create_repo(REFERENCE_REPO)
    api.upload_folder(folder_path=workdir / "hydra_ref", repo_id=REFERENCE_REPO)
    api.create_repo(BASE_REPO)
    api.upload_folder(folder_path=workdir / "base", repo_id=BASE_REPO)
    base_sha = api.upload_file(path_or_fileobj=b"# tiny base\n", path_in_repo="README.md", repo_id=BASE_REPO).oid

    AutoTokenizer.from_pretrained(BASE_REPO)  # as users do: the tokenizer is in the cache, so it is fingerprinted
    base = AutoModelForCausalLM.from_pretrained(BASE_REPO)
    model = HydraForCausalLM.from_base(base, head_arch="hydra++", num_heads=3, num_layers=2)
    randomize_heads(model, seed=1)
    first = model.push_to_hub(HEADS_REPO, token=TOKEN, private=True, benchmark=workdir / "bench.json")
    model.save_pretrained(workdir / "ref_first")
    randomize_heads(model, seed=2)
    second = model.push_to_hub(HEADS_REPO, token=TOKEN, commit_message="retrained")
    model.save_pretrained(workdir / "ref_second")
    # A later base commit: the heads were trained on `base_sha`, "main" has moved on.
    later_base_sha = api.upload_file(path_or_fileobj=b"# tiny base v2\n", path_in_repo="README.md",
                                     repo_id=BASE_REPO).oid

    folder = workdir / "ref_cli"  # a training output folder: heads plus files that must stay local
    model.save_pretrained(folder)
    (folder / "metrics.jsonl").write_text("{}\n")
    (folder / "tree_tuning.json").write_text(json.dumps({  # as `hf-hydra tune-tree` leaves it: goes with the heads
        "command": "hf-hydra tune-tree --heads heads/ --features features/ --max-tokens 2", "prepacked": False,
        "rank_accuracy": [[0.5, 0.1], [0.3, 0.1], [0.2, 0.1]], "verify_seconds": [0.010, 0.011],
        "choice": {"paths": [[0]], "expected_tau": 1.5, "expected_tokens_per_second": 136.4},
    }))
    (folder / "checkpoints" / "step-00000001").mkdir(parents=True)
    (folder / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"0" * 64)
    status = cli.main(["push", str(folder), "--repo", CLI_REPO, "--token", TOKEN])
    branch_status = cli.main(["push", str(folder), "--repo", CLI_REPO, "--token", TOKEN, "--revision", "experiment"])
    model.save_pretrained(workdir / "ref_save_push", push_to_hub=True, repo_id=SAVE_PUSH_REPO, token=TOKEN)
    (workdir / "push.json").write_text(json.dumps({
        "first": first.oid, "second": second.oid, "base_sha": base_sha, "later_base_sha": later_base_sha,
        "cli_status": status, "branch_status": branch_status, "recorded_revision": model.config.base_model_revision,
        "recorded_fingerprint": model.config.base_tokenizer_fingerprint,
    }))


def pull(workdir: Path) -> None:
    """Pull through AutoModelForCausalLM: main, an older revision, without the token, with a moved base; load and
    convert the reference checkpoint from the Hub."""
    from hf_hydra import cli

    cache = workdir / "cache"
    _pull(workdir, "pulled_main", HEADS_REPO, token=TOKEN, cache_dir=cache)
    first = json.loads((workdir / "push.json").read_text())["first"]
    _pull(workdir, "pulled_first", HEADS_REPO, token=TOKEN, cache_dir=cache, revision=first)
    _pull(workdir, "pulled_cli", CLI_REPO, cache_dir=cache)  # public
    no_token = _error(lambda: AutoModelForCausalLM.from_pretrained(HEADS_REPO, cache_dir=workdir / "cache_no_token"))
    reference = HydraForCausalLM.from_pretrained(REFERENCE_REPO, cache_dir=cache)  # base from its config, on the Hub
    save_heads(reference, workdir / "pulled_reference.safetensors")
    assert cli.main(["convert", REFERENCE_REPO, str(workdir / "converted_reference")]) == 0

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hf_hydra").addHandler(handler)
    moved_base = AutoModelForCausalLM.from_pretrained(BASE_REPO)  # "main": a later commit than the heads'
    HydraForCausalLM.from_pretrained(HEADS_REPO, base_model=moved_base, token=TOKEN, cache_dir=cache)
    (workdir / "pull.json").write_text(json.dumps({"no_token": no_token, "warnings": records}))


def offline(workdir: Path) -> None:
    """HF_HUB_OFFLINE=1: from the cache `pull` populated, then from an empty cache."""
    _pull(workdir, "offline", HEADS_REPO, cache_dir=workdir / "cache")
    empty = _error(lambda: AutoModelForCausalLM.from_pretrained(HEADS_REPO, cache_dir=workdir / "empty_cache"))
    explicit = _error(lambda: HydraForCausalLM.from_pretrained(HEADS_REPO, cache_dir=workdir / "empty_cache"))
    (workdir / "offline.json").write_text(json.dumps({"auto": empty, "explicit": explicit}))


def mirror(workdir: Path) -> None:
    """Pull through olah, which serves a local git repo of the artifact."""
    _pull(workdir, "mirrored", "org/mirrored-heads", cache_dir=workdir / "mirror_cache")


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    {"push": push, "pull": pull, "offline": offline, "mirror": mirror}[scenario](workdir)
