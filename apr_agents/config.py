"""Run limits and knobs, validated at construction (SPEC §3, §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Dialect = Literal["canonical", "multiverse", "apr"]


class APRConfig(BaseModel):
    """Limits of one agent. Every limit is enforced and shows up in the trace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_threads: int = Field(8, ge=1, le=1024, description="branches per spawn; extra outlines are dropped")
    max_depth: int = Field(2, ge=0, le=32, description="spawn levels; root is depth 0")
    max_total_threads: int = Field(64, ge=0, le=100_000, description="branches per run")
    max_tokens: int = Field(2048, ge=1, le=1_000_000, description="generated tokens per context")
    max_steps: int = Field(32, ge=1, le=10_000, description="backend calls per context")
    thread_timeout_s: float = Field(300.0, gt=0, allow_inf_nan=False, description="wall-clock budget of one branch")
    run_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                        description="wall-clock budget of the whole run (None: none)")
    llm_concurrency: int = Field(16, ge=1, le=10_000, description="backend calls in flight at once")
    tool_concurrency: int = Field(16, ge=1, le=10_000, description="tool calls in flight at once")
    tool_rate_per_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                          description="tool calls started per second (None: no cap)")
    tool_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False, description="one tool call's budget")
    max_tool_output_chars: int = Field(8000, ge=64, description="longer tool output is cut with a marker")
    max_tool_calls_per_step: int = Field(16, ge=1, le=1024)
    backend_attempts: int = Field(3, ge=1, le=20, description="tries per backend call before failing")
    backend_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                            description="one backend call's budget (None: only the deadlines)")
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    dialect: Dialect = "canonical"
    parallel: bool = Field(True, description="False runs every spawn's branches one after another")
    spawn_at: Literal["outlines", "outline"] = Field(
        "outlines",
        description="when branches start: 'outlines' (ThreadWeaver's: all together at the spawn point, after "
                    "the last outline), or 'outline' (eager, text mode, tag dialects: branch i starts as soon "
                    "as outline i is closed, while the model writes the next one; the branches run within "
                    "the parent's step (not resumable halfway) and see the outlines up to their own; docs/architecture.md)")

    @model_validator(mode="after")
    def _eager_needs_parallel_tags(self) -> APRConfig:
        if self.spawn_at == "outline" and (not self.parallel or self.dialect == "apr"):
            raise ValueError("spawn_at='outline' starts each branch while the next outline is written: it "
                             "needs parallel=True and a tag dialect (canonical or multiverse), not "
                             f"parallel={self.parallel}, dialect={self.dialect!r}")
        return self
