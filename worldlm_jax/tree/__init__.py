"""The federation tree and its rules, on the host (numpy, no JAX).

    policy      Policy: a federation's autonomous rules (optimizers, rounds, DP,
                sampling, faults), inherited down the tree
    topology    build_topology: a tree spec -> Topology (levels, clients, policies)
    provenance  policy_provenance: each federation's resolved policy, field by
                field, and where each value came from (set, inherited, config)

The names below are stable; the modules' other names are not.
"""
from worldlm_jax.tree.policy import POLICY_FIELDS, Policy, TopologyError, inherit_policy
from worldlm_jax.tree.provenance import FederationPolicy, format_provenance, policy_provenance
from worldlm_jax.tree.topology import Level, Topology, build_topology

__all__ = ["Topology", "Level", "build_topology", "Policy", "POLICY_FIELDS", "TopologyError", "inherit_policy",
           "policy_provenance", "format_provenance", "FederationPolicy"]
