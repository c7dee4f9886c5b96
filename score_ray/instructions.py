"""The paper's instructions, verbatim (PAPER.md, "Prompts"), and how a problem sits around them: the
defaults of the ``prompts`` config section."""

MATH_FIRST_TURN = (
    "You are a math expert. When you respond, respond only with the Solution of the final Problem, thinking "
    "step by step. At the end of the Solution, when you give your final answer, write it in the form "
    '"Final Answer: The final answer is $answer$. I hope it is correct."'
)
MATH_SELF_CORRECTION = (
    "There might be an error in the solution above because of lack of understanding of the question. Please "
    "correct the error, if any, and rewrite the solution. Only output the final solution! At the end of the "
    "Solution, when you give your final answer, write it in the form "
    '"Final Answer: The final answer is $answer$. I hope it is correct."'
)
CODE_SELF_CORRECTION = (
    "There might be an error in the code above because of lack of understanding of the question. Please "
    "correct the error, if any, and rewrite the solution. Only output the final correct Python program!"
)
# The paper trains code with MBPP's standard prompt ("You are an expert Python programmer, and here is
# your task: ..."); its 3-shot examples come from the data (see data.FileSource.fewshot_*), and
# HumanEval is evaluated zero-shot. This opening line is the MBPP prompt's.
CODE_FIRST_TURN = "You are an expert Python programmer, and here is your task:"

# How a problem sits around the instruction in the first user message (config keys).
MATH_USER_TEMPLATE = "{instruction}\n\nProblem:\n{problem}"
CODE_USER_TEMPLATE = "{instruction} {problem}"
