"""Speculative greedy decoding with Hydra heads on the default base model, compared with plain generate.

    python examples/speculative_generate.py [HEADS_DIR_OR_REPO]

Without an argument, fresh (untrained) Hydra heads are used: the output is still exactly plain greedy
decoding, but tau stays near 1 until the heads are trained.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_hydra
from hf_hydra import HydraForCausalLM


def main() -> None:
    base_path = hf_hydra.assets.default_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if len(sys.argv) > 1:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # a HydraForCausalLM after `import hf_hydra`
    else:
        model = HydraForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(base_path), head_arch="hydra")

    question = hf_hydra.assets.mt_bench_questions()[0]["turns"][0]
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]

    fast = model.generate(input_ids, max_new_tokens=96, speculative=True, return_dict_in_generate=True)
    plain = model.generate(input_ids, max_new_tokens=96)
    print(tokenizer.decode(fast.sequences[0, input_ids.shape[1] :], skip_special_tokens=True))
    stats = fast.speculation
    print(f"\ntau={stats.tau:.2f} over {stats.steps} verification steps; identical to plain generate: "
          f"{bool((fast.sequences == plain).all())}")


if __name__ == "__main__":
    main()
