"""Runs vLLM's offline engine on a folder and writes what it generated, for the tests of the
vLLM plugin; it runs in .venv-vllm (vLLM's CPU build), the tests in .venv.

python tests/vllm_driver.py FOLDER OUT.json --prompts P.json [--dtype float32] [--max-tokens N]
    [--eager] [--tensor-parallel-size N] [--memory-share F]

OUT.json: one entry per prompt: the prompt's token ids, the logprob vLLM gives each prompt
token, the greedy tokens and, for each, the logprobs of the top 5 candidates.
"""

import argparse
import json


def main() -> None:
    from vllm import LLM, SamplingParams

    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    # on CPU the share of the machine's memory vLLM reserves (weights and KV cache); the
    # default 0.92 fails while the test process holds models of its own
    parser.add_argument("--memory-share", type=float, default=0.3)
    args = parser.parse_args()
    prompts = json.loads(open(args.prompts).read())
    llm = LLM(model=args.folder, dtype=args.dtype, max_model_len=512, enforce_eager=args.eager,
              tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.memory_share, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=5, prompt_logprobs=0, ignore_eos=True)
    results = []
    for out in llm.generate(prompts, params):
        completion = out.outputs[0]
        results.append({
            "prompt_ids": out.prompt_token_ids,
            "prompt_logprobs": [None if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, out.prompt_token_ids)],
            "tokens": list(completion.token_ids),
            "top": [{str(t): p.logprob for t, p in d.items()} for d in completion.logprobs],
        })
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM starts its engine in processes of its own
    main()
