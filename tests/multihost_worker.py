"""One process of tests/test_multihost.py: the tiny 8-head, 2-KV-head model at tensor parallel 8
over two processes of 4 CPU devices. Process 0 generates and prints the outputs as JSON;
process 1 runs the steps process 0 broadcasts.

    python tests/multihost_worker.py COORDINATOR_ADDRESS PROCESS_ID TOKENIZER_DIR
"""

import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"


def main(coordinator: str, process_id: int, tokenizer_dir: str) -> None:
    from jaxserve import multihost
    from jaxserve.engine import Engine
    from jaxserve.sampling import SamplingParams
    from jaxserve.tokenizer import Tokenizer
    from tests.test_parallel import ENGINE, PROMPTS, generate, tiny

    config = dataclasses.replace(ENGINE, tensor_parallel_size=8, coordinator_address=coordinator,
                                 num_processes=2, process_id=process_id)
    multihost.initialize(config)
    import jax

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    engine = Engine.from_components(config, tiny(2), Tokenizer.from_dir(tokenizer_dir))
    if multihost.is_leader():
        greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True)
        out = {"greedy": {r: o.token_ids for r, o in generate(engine, PROMPTS, greedy).items()},
               "sampled": {r: o.token_ids for r, o in generate(engine, PROMPTS[:2], sampled).items()}}
        multihost.stop_workers(engine)
        print("RESULT " + json.dumps(out), flush=True)
    else:
        print(f"WORKER ran {multihost.run_worker(engine)} steps", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
