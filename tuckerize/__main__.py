"""``python -m tuckerize``: the command line (:mod:`tuckerize.cli`)."""

from tuckerize.cli import app

if __name__ == "__main__":  # vLLM (--runtime vllm) starts processes by spawn, which re-imports __main__
    app()
