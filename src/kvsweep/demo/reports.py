"""The demo's GovReport-like reports: facts stated once at the start, recalled now and then later."""

import random

AGENCIES = ["Department of Defense", "Department of Energy", "Internal Revenue Service", "Federal Aviation Administration",
            "Environmental Protection Agency", "Department of Veterans Affairs", "Social Security Administration",
            "Department of Homeland Security", "Department of Education", "Forest Service"]  # fmt: skip
PROGRAMS = ["acquisition program", "grant program", "security program", "modernization effort", "oversight process",
            "data system", "pilot program", "workforce plan"]  # fmt: skip
CODENAMES = ["Atlas", "Beacon", "Cedar", "Delta", "Ember", "Falcon", "Granite", "Harbor", "Iris", "Juniper", "Keystone",
             "Lantern", "Meridian", "Nova", "Orion", "Pioneer", "Quartz", "Raven", "Summit", "Titan", "Vector",
             "Willow", "Zephyr", "Aurora"]  # fmt: skip
FINDINGS = ["did not fully track costs", "lacked reliable data", "had not set measurable goals", "faced schedule delays",
            "did not document decisions", "exceeded its budget", "had gaps in oversight", "relied on outdated systems"]  # fmt: skip
RECOMMEND = ["develop a plan", "improve its data", "clarify roles", "report to Congress", "set performance goals",
             "strengthen oversight", "update its guidance", "assess risks"]  # fmt: skip
VERBS = ["reviewed", "examined", "assessed", "audited"]
SPEAKERS = ["Officials", "Staff", "Managers", "Contractors", "Auditors", "Users"]
SAID = ["said", "noted", "reported", "stated", "told us"]
REMARKS = ["that the work was complex", "that funding was uncertain", "that guidance was unclear",
           "that training was needed", "that staffing was limited", "that data were incomplete",
           "that costs were rising", "that schedules slipped"]  # fmt: skip


def generate_report(rng: random.Random, index: int) -> dict:
    """A report whose facts (agency, program, its code name, budget, finding, recommendation) are
    stated in its first sentences and recalled now and then in a body of remarks: predicting a
    recall needs the facts' tokens, which lie far behind any local window. The summary restates
    the facts, so a model that lost them cannot summarize."""
    agency, program, code = rng.choice(AGENCIES), rng.choice(PROGRAMS), rng.choice(CODENAMES)
    finding, recommendation, verb = rng.choice(FINDINGS), rng.choice(RECOMMEND), rng.choice(VERBS)
    year, amount = rng.randint(2005, 2024), rng.randint(10, 99)
    sentences = [
        f"GAO {verb} the {agency} {program} , known as {code} .",
        f"The {code} began in {year} with a budget of {amount} million dollars .",
        f"GAO found that the {code} {finding} .",
        f"GAO recommends that the {agency} {recommendation} .",
    ]
    # Every fifth report is very short, so the demo exercises `min_length`.
    for _ in range(2 if index % 5 == 4 else rng.randint(25, 60)):
        draw = rng.random()
        if draw < 0.2:
            sentences.append(f"Officials said the {code} {rng.choice(FINDINGS)} .")
        elif draw < 0.32:
            sentences.append(f"The {code} budget was {amount} million dollars in {year} .")
        elif draw < 0.4:
            sentences.append(f"The {agency} agreed to {recommendation} .")
        else:
            sentences.append(f"{rng.choice(SPEAKERS)} {rng.choice(SAID)} {rng.choice(REMARKS)} .")
    summary = (
        f"GAO {verb} the {agency} {program} known as {code} . GAO found that the {code} {finding} . "
        f"GAO recommends that the {agency} {recommendation} ."
    )
    return {"id": f"demo-{index:03d}", "report": " ".join(sentences), "summary": summary}


def generate_reports(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [generate_report(rng, i) for i in range(n)]
