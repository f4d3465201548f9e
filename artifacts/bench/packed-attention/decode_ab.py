"""Tree decoding with the shipped heads (argv[1], default hydra++; argv[2] prompts, default 6), packed GQA attention
vs transformers' sdpa, interleaved per prompt
(same process, prepacked base and heads); whether the two give the same tokens.
import statistics, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_hydra import HydraForCausalLM, assets
from hf_hydra.prepack import prepack_linear_layers

torch.set_num_threads(1)
arch = sys.argv[1] if len(sys.argv) > 1 else "hydra++"
n_prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 6
src = assets.default_base_model_path()
tok = AutoTokenizer.from_pretrained(src)
models = {}
for name in ("sdpa", "packed"):
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    m = HydraForCausalLM.from_pretrained(assets.pretrained_heads_path(arch), base_model=base)
    prepack_linear_layers(base)
    m.prepack_heads()
    if name == "sdpa":
        base.set_attn_implementation("sdpa")
    models[name] = m
print({n: m.base_lm.config._attn_implementation for n, m in models.items()})
questions = assets.mt_bench_questions()[::80 // n_prompts][:n_prompts]
ratios, same = [], 0
for q in questions:
    ids = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    t = {}
    outs = {}
    for name, m in models.items():
        start = time.perf_counter()
        out = m.generate(ids, max_new_tokens=192, do_sample=False, speculative=True, return_dict_in_generate=True)
        t[name] = time.perf_counter() - start
        outs[name] = out
    same += torch.equal(outs["sdpa"].sequences, outs["packed"].sequences)
    ratios.append(t["sdpa"] / t["packed"])
    print(f"{q['category']:12s} len {ids.shape[1]:4d} tau {outs['packed'].speculation.tau:.2f} sdpa {t['sdpa']:.2f}s packed {t['packed']:.2f}s ratio {ratios[-1]:.3f}", flush=True)
print(f"median speed ratio packed over sdpa {statistics.median(ratios):.3f}; identical outputs {same}/{len(questions)}")
