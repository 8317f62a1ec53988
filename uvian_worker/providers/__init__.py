"""LLM providers behind one streaming interface: OpenAI-compatible, RunPod, the simulator."""
