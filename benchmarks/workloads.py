"""The request mixes the benchmark sends: what each one stresses, and why it is built this way.

- ``short-chat``: short clinical questions, greedy, ``--max-tokens`` out: the everyday EMR call;
  measures decode speed and batching.
- ``long-prompt``: a ~2,000-token synthetic clinical guideline followed by a question.  Phase
  ``cold`` gives every request a unique system line first, so no prefix cache (medserve's,
  llama-server's, vLLM's) can serve any block of it: TTFT is the full prefill.  Phase ``cached``
  then sends the identical requests again: TTFT is a prefix-cache hit (or, on a server without
  one, a second full prefill; the two figures side by side show which).
- ``long-output``: asks for a long teaching text with ``max_tokens`` 1,000 and no
  ``ignore_eos`` (not every server has it): the model may stop earlier, so the report gives the
  number of tokens that actually came.

All text is synthetic general medical knowledge: no patient data.  Decoding is greedy so the
work per request is the same from run to run and from server to server.
"""

from __future__ import annotations

from dataclasses import dataclass

SHORT_CHAT_PROMPTS = (
    "Explain the difference between type 1 and type 2 diabetes.",
    "List common symptoms of community-acquired pneumonia.",
    "What are the first-line treatments for hypertension?",
    "Describe how to interpret a complete blood count.",
    "Summarise the warning signs of a stroke.",
    "What is the role of the kidneys in regulating blood pressure?",
    "Explain what an ECG measures and why it is used.",
    "Describe the stages of wound healing.",
)

LONG_OUTPUT_TOPICS = (
    "the management of chronic heart failure",
    "the assessment and treatment of asthma in adults",
    "the prevention and treatment of sepsis on a general ward",
    "the long-term care of type 2 diabetes",
)

# Generic guideline paragraphs (no patient data), cycled with section numbers to the length asked.
GUIDELINE_PARAGRAPHS = (
    "Hand hygiene is performed before and after every patient contact, before aseptic tasks, "
    "after exposure to body fluids and after touching the patient surroundings. Alcohol-based "
    "rub is preferred unless hands are visibly soiled, in which case soap and water are used. "
    "Gloves do not replace hand hygiene and are changed between tasks on the same patient.",
    "Early warning scores combine respiratory rate, oxygen saturation, temperature, systolic "
    "blood pressure, heart rate and level of consciousness. A rising score prompts more "
    "frequent observations and a timely medical review; a high score triggers the rapid "
    "response team. Trends matter more than a single value, so observations are charted.",
    "Medication reconciliation on admission compares the medicines the patient was taking at "
    "home with those prescribed in hospital. Discrepancies are documented and resolved with "
    "the prescriber. High-risk medicines such as anticoagulants, insulin and opioids receive "
    "a second independent check before administration and at every transfer of care.",
    "Venous thromboembolism risk is assessed within twenty-four hours of admission and again "
    "when the clinical situation changes. Mechanical prophylaxis is considered when "
    "pharmacological prophylaxis is contraindicated. Patients are encouraged to mobilise early "
    "and to stay well hydrated, and the plan is explained to them in plain language.",
    "Pressure injury prevention starts with a skin inspection on admission and a validated risk "
    "assessment. Patients at risk are repositioned on a schedule, nutrition and continence "
    "are addressed, and pressure-redistributing surfaces are used. Any new injury is graded, "
    "photographed where policy allows, and reported through the incident system.",
    "Sepsis is suspected in any patient with infection and signs of organ dysfunction. Blood "
    "cultures are taken before antibiotics when this causes no delay, lactate is measured, "
    "and broad-spectrum antibiotics are given within one hour of recognition. Fluid "
    "resuscitation is guided by repeated assessment rather than by a fixed volume.",
    "Falls prevention combines a review of medicines that cause sedation or hypotension, "
    "assessment of vision and footwear, a clear path to the bathroom and a call bell within "
    "reach. After a fall the patient is examined for injury before being moved, neurological "
    "observations are started when the head may have been struck, and the family is informed.",
    "Discharge planning begins on admission. The team confirms follow-up appointments, "
    "arranges community services, and gives written information about medicines, warning "
    "signs and whom to contact. A summary is sent to the family doctor on the day of "
    "discharge so that care continues without gaps.",
)
LONG_PROMPT_QUESTION = (
    "Using only the guideline above, list the three actions that most reduce harm on a "
    "general ward, one sentence each."
)
# SmolLM2's tokenizer gives ~1.3 tokens per English word of this text; used only to size
# the prompt (the reports give the real count from the server's usage).
TOKENS_PER_WORD = 1.3


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One chat request: OpenAI-style messages, greedy decoding, at most ``max_tokens`` out."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    max_tokens: int
    temperature: float = 0.0

    def openai_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True, slots=True)
class Phase:
    """Requests measured together; a workload with two phases runs them in order."""

    name: str  # "" when the workload has a single phase
    requests: tuple[WorkloadRequest, ...]


@dataclass(frozen=True, slots=True)
class WorkloadSettings:
    num_requests: int = 32
    max_tokens: int = 128  # short-chat answers, and the long-prompt answer
    long_prompt_tokens: int = 2000
    long_output_tokens: int = 1000


def short_chat(settings: WorkloadSettings, nonce: str) -> list[Phase]:
    del nonce  # the same questions every run, as before: comparable with older figures
    requests = tuple(
        WorkloadRequest(
            (("user", SHORT_CHAT_PROMPTS[i % len(SHORT_CHAT_PROMPTS)]),), settings.max_tokens
        )
        for i in range(settings.num_requests)
    )
    return [Phase("", requests)]


def guideline_text(target_tokens: int) -> str:
    """Synthetic guideline of about ``target_tokens`` tokens (estimated, see TOKENS_PER_WORD)."""
    target_words = max(1, int(target_tokens / TOKENS_PER_WORD))
    sections: list[str] = []
    words = 0
    while words < target_words:
        paragraph = GUIDELINE_PARAGRAPHS[len(sections) % len(GUIDELINE_PARAGRAPHS)]
        sections.append(f"Section {len(sections) + 1}. {paragraph}")
        words += len(sections[-1].split())
    return "\n\n".join(sections)


def long_prompt(settings: WorkloadSettings, nonce: str) -> list[Phase]:
    body = guideline_text(settings.long_prompt_tokens) + "\n\n" + LONG_PROMPT_QUESTION
    requests = tuple(
        WorkloadRequest(
            (
                # First tokens unique per request (and per run via the nonce): no cache hit.
                ("system", f"Session {nonce}-{i}. You are a hospital guideline assistant."),
                ("user", body),
            ),
            settings.max_tokens,
        )
        for i in range(settings.num_requests)
    )
    return [Phase("cold", requests), Phase("cached", requests)]


def long_output(settings: WorkloadSettings, nonce: str) -> list[Phase]:
    del nonce
    requests = tuple(
        WorkloadRequest(
            (
                (
                    "user",
                    "Write a detailed teaching text of at least 1,500 words on "
                    f"{LONG_OUTPUT_TOPICS[i % len(LONG_OUTPUT_TOPICS)]}. Cover definition, "
                    "causes, symptoms, examination, investigations, differential diagnosis, "
                    "treatment, complications, prognosis and patient education, each in its "
                    "own section.",
                ),
            ),
            settings.long_output_tokens,
        )
        for i in range(settings.num_requests)
    )
    return [Phase("", requests)]


WORKLOADS = {"short-chat": short_chat, "long-prompt": long_prompt, "long-output": long_output}


def build(name: str, settings: WorkloadSettings, nonce: str) -> list[Phase]:
    """The phases of workload ``name``; ``nonce`` must differ for every run of every target."""
    return WORKLOADS[name](settings, nonce)
