"""Generation engines: who turns prompt token ids into sampled completions.

- base.py                the seam: SamplingParams, Sample, AdapterRef, the Engine protocol, seeds
- prompts.py             records to prompt ids (chat template, system prompt, left truncation)
- transformers_engine.py our batched KV-cache sampler on a transformers model (the reference)
- vllm_engine.py         vLLM in this process (CPU or GPU)
- server.py              any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, an API)
- generator.py           tokenizer + engine: records in, samples out; loads the engine a user chose
"""
