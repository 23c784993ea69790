#!/usr/bin/env bash
# Demo steps of the llm family; filled in with its commands.
set -euo pipefail
