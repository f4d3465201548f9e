"""SmolLM2's prepacked verification forward over T=6 tree tokens after P cached tokens (argv[1], default 400):
transformers' sdpa (repeat_kv copies the KV heads when a mask is given and q > 1) vs hf_hydra's packed GQA
attention. One thread, the two interleaved, medians; and whether the logits are equal bit for bit."""

import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_hydra import assets
from hf_hydra.attention import use_packed_gqa_attention
from hf_hydra.cache_name import cache_argument
from hf_hydra.prepack import prepack_linear_layers
from hf_hydra.tree import causal_mask

torch.set_num_threads(1)
P, T = (int(sys.argv[1]) if len(sys.argv) > 1 else 400), 6
models = {}
for name in ("sdpa", "packed"):
    model = AutoModelForCausalLM.from_pretrained(assets.default_base_model_path(), dtype=torch.float32).eval()
    prepack_linear_layers(model)
    if name == "packed":
        use_packed_gqa_attention(model)
    models[name] = model
prompt = torch.randint(0, 40000, (1, P), generator=torch.Generator().manual_seed(0))
tree_tokens = torch.randint(0, 40000, (1, T), generator=torch.Generator().manual_seed(1))
mask = causal_mask(T, P, torch.float32, torch.device("cpu"))  # (1, 1, T, P + T)
times, logits = {name: [] for name in models}, {}
with torch.no_grad():
    caches = {name: DynamicCache() for name in models}
    for name, model in models.items():
        model(prompt, **cache_argument(caches[name]), use_cache=True)
    for _ in range(40):
        for name, model in models.items():
            start = time.perf_counter()
            out = model(
                tree_tokens,
                attention_mask=mask,
                position_ids=(P + torch.arange(T))[None],
                **cache_argument(caches[name]),
                use_cache=True,
            )
            times[name].append(time.perf_counter() - start)
            caches[name].crop(-T)
            logits[name] = out.logits
medians = {name: statistics.median(ts[5:]) for name, ts in times.items()}
print(f"P={P} T={T}: sdpa {1e3 * medians['sdpa']:.2f} ms, packed {1e3 * medians['packed']:.2f} ms, "
      f"ratio packed/sdpa {medians['packed'] / medians['sdpa']:.3f}, "
      f"logits bit-identical {torch.equal(logits['sdpa'], logits['packed'])}")
