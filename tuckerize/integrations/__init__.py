"""Integrations with other engines (vLLM). The core package never imports these."""
