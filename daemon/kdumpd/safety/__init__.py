"""The safety gate: everything that can stop kdumpd from touching old memory, in one place.

Each rule comes from a failure seen in the field; each refusal names its rule. Rules only
ever take memory away from the plan.
"""
