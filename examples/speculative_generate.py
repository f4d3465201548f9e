"""Speculative greedy decoding with Hydra heads on the default base model, compared with plain generate.

    python examples/speculative_generate.py [HEADS_DIR_OR_REPO]

Without an argument, the Hydra++ heads shipped with the package for SmolLM2-135M-Instruct are used.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_hydra


def main() -> None:
    base_path = hf_hydra.assets.default_base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    heads = sys.argv[1] if len(sys.argv) > 1 else str(hf_hydra.assets.pretrained_heads_path("hydra++"))
    model = AutoModelForCausalLM.from_pretrained(heads)  # a HydraForCausalLM after `import hf_hydra`

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
