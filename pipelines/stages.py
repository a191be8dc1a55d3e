"""The stages, in the order a run takes them. A new stage is a module with its config, its ``Stage`` subclass and
its report, plus one entry here; the recipe gets its section, the runner and preflight run it, the CLI summarises
it and docs/recipe-reference.md documents it (``python -m domainsynth.pipelines.reference``)."""

from .curation.embed import Embed
from .curation.index import Index
from .curation.retrieve import Retrieve
from .curation.select import Select
from .evaluation.evaluate import Evaluate
from .synthesis.generate import Generate
from .synthesis.judge import Judge
from .synthesis.qc import Qc
from .synthesis.synthesize import Synthesize
from .training.finetune import Finetune
from .training.preference import Preference
from .training.pretrain import Pretrain
from .training.softprompt import SoftPrompt

# softprompt before synthesize: DOMINO samples from the soft prompt it learns. qc before judge: dropping duplicates is
# cheap, a judgment is an LLM call per row. Then the model is adapted: pretrain, finetune on the samples, preference;
# and evaluate scores what the run made.
STAGES = (Select(), Embed(), Index(), Retrieve(), Generate(), SoftPrompt(), Synthesize(), Qc(), Judge(), Pretrain(),
          Finetune(), Preference(), Evaluate())
