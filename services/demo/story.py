"""What the demo's user asks for and how its agents fare: the seed's three agents, four
plans that tell the story (a retry, an approval given and one refused, a step that keeps
failing, brains and dismissals), and small plans that keep coming while the demo runs on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

USER = "test@example.com"  # the seed's test user
OPERATOR = "ops@example.com"  # syncs the catalog and checks the devices
AGENTS = {  # the seed's three agents, and the model each one works with
    "CodeAssistant": "qwen/qwen-2.5-coder-32b-instruct",  # via OpenRouter: reports its cost
    "DataAnalyst": "deepseek/deepseek-chat",  # stats prices its calls from the catalog
    "DocumentWriter": "llama3.1:8b",  # on the local device: free
}
REPORTS_COST = {"CodeAssistant"}
REPRICED = "deepseek/deepseek-chat"  # the catalog's re-sync raises its completion price
NEW_COMPLETION_PRICE = "0.0000014"  # USD per token, was 0.0000011
ALWAYS = 1000  # fails every attempt


@dataclass(frozen=True)
class Step:
    id: str
    description: str
    agent: str
    after: tuple[str, ...] = ()
    fails: int = 0  # attempts the agent fails before one succeeds
    approval: Literal["approved", "rejected"] | None = None  # what the user decides
    max_attempts: int | None = None


@dataclass(frozen=True)
class Script:
    task: str
    steps: tuple[Step, ...]
    brains: tuple[tuple[str, int], ...] = ()  # (agent, brains) the user gives afterwards
    dismiss: tuple[str, str] | None = None  # (agent, reason): its model leaves the session


STORY = (
    Script(
        "Add CSV export to the reports API",
        (
            Step("spec", "Write the spec of the CSV export", "DocumentWriter"),
            Step("code", "Implement GET /reports/{id}.csv", "CodeAssistant", ("spec",), fails=1),
            Step("tests", "Test empty and huge reports", "CodeAssistant", ("code",)),
            Step("docs", "Document the endpoint", "DocumentWriter", ("code",)),
            Step("merge", "Deploy it", "CodeAssistant", ("tests", "docs"), approval="approved"),
        ),
        brains=(("CodeAssistant", 2), ("DocumentWriter", 1)),
    ),
    Script(
        "Quarterly churn analysis",
        (
            Step("load", "Load last quarter's subscriptions", "DataAnalyst"),
            Step("cohorts", "Churn by signup cohort", "DataAnalyst", ("load",)),
            Step("drivers", "Find what drives churn", "DataAnalyst", ("load",), fails=1),
            Step("report", "Write the churn report", "DocumentWriter", ("cohorts", "drivers")),
            Step(
                "send", "Mail it to customers", "DocumentWriter", ("report",), approval="rejected"
            ),
        ),
        dismiss=("DataAnalyst", "the cohort numbers did not add up"),
    ),
    Script(
        "Migrate the billing cron job",
        (
            Step("inventory", "List the job's dependencies", "CodeAssistant"),
            Step("port", "Port it", "CodeAssistant", ("inventory",), fails=ALWAYS, max_attempts=2),
            Step("announce", "Announce the migration", "DocumentWriter", ("port",)),
        ),
        dismiss=("CodeAssistant", "kept failing the migration"),
    ),
    Script(
        "Weekly KPI digest",
        (
            Step("kpis", "Compute this week's KPIs", "DataAnalyst"),
            Step("digest", "Write the digest", "DocumentWriter", ("kpis",)),
        ),
        brains=(("DataAnalyst", 1),),
    ),
)

BACKGROUND = (  # what keeps coming while the demo runs on
    Script(
        "Fix a flaky test",
        (Step("fix", "Find and fix the flaky test", "CodeAssistant"),),
        brains=(("CodeAssistant", 1),),
    ),
    Script(
        "Answer a data question",
        (
            Step("query", "Query signups by region", "DataAnalyst"),
            Step("answer", "Write the answer", "DocumentWriter", ("query",)),
        ),
    ),
    Script(
        "Review a pull request",
        (
            Step("review", "Review the diff", "CodeAssistant", fails=1),
            Step("summary", "Summarise the review", "DocumentWriter", ("review",)),
        ),
        brains=(("DocumentWriter", 1),),
    ),
    Script(
        "Release notes",
        (
            Step("changes", "Collect the merged changes", "DataAnalyst"),
            Step("notes", "Write the release notes", "DocumentWriter", ("changes",)),
        ),
    ),
)
