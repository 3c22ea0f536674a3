"""Run in a subprocess by the vLLM tests: serve a checkpoint with vLLM and write JSON with
greedy tokens, prompt log-probabilities along prompt + generated tokens, the name and
shape of every tensor of the loaded model on every rank, how each rank split vLLM's
linear layers, and (eager runs) the MoE blocks the serving bench's timers find on each rank
and the token counts of the calls they timed over one more short generation.

    python tests/vllm_plugin/vllm_worker.py '{"model": ..., "tp": 1, "prompts": [[ids]], "max_tokens": 32, "out": ...}'
"""

import json
import os
import sys


def main():
    args = json.loads(sys.argv[1])
    tp = int(args.get("tp", 1))
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model across worker processes
    if tp == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from tuckerize.integrations.vllm.probes import (install_moe_timers, linear_partitions, moe_block_names,  # importable by every worker
                                                    take_moe_times, tensor_shapes)

    extra = {"distributed_executor_backend": "uni"} if tp == 1 else {}
    if args.get("custom_ops"):  # e.g. ["-rotary_embedding"]: that vLLM op's native torch path
        extra["compilation_config"] = {"custom_ops": list(args["custom_ops"])}
    llm = LLM(model=args["model"], dtype=args.get("dtype", "float32"), tensor_parallel_size=tp, max_model_len=args.get("max_model_len", 256),
              max_num_seqs=8,
              enforce_eager=not args.get("compile", False), seed=0, max_logprobs=1,
              skip_tokenizer_init=bool(args.get("no_tokenizer", False)),
              enable_expert_parallel=bool(args.get("expert_parallel", False)), **extra)
    prompts = [{"prompt_token_ids": p} for p in args["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True, detokenize=False)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    full = [{"prompt_token_ids": p + t} for p, t in zip(args["prompts"], tokens)]
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    logprobs = []
    for req, out in zip(full, llm.generate(full, score, use_tqdm=False)):
        ids = req["prompt_token_ids"]
        logprobs.append([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
    shapes = llm.apply_model(tensor_shapes)
    layers = llm.apply_model(linear_partitions)
    result = {"tokens": tokens, "logprobs": logprobs, "shapes": shapes, "layers": layers}
    if not args.get("compile", False):  # the timers wrap eager forwards
        result["moe_blocks"] = llm.apply_model(moe_block_names)
        result["moe_timed"] = llm.apply_model(install_moe_timers)
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, detokenize=False),
                     use_tqdm=False)
        result["moe_calls"] = [[n for n, _ in calls] for calls in llm.apply_model(take_moe_times)]
    with open(args["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
