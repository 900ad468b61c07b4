"""Canary rollouts: move traffic from a production adapter (or revision) to a candidate in
steps, judge each interval on metrics, promote on success and roll back on failure.

The controller is stateless: every rollout's state (:mod:`lorafleet.rollout.state`) lives
in a store (:mod:`lorafleet.rollout.store`: a ConfigMap in the cluster, a JSON file
locally), so a controller killed mid-rollout and restarted continues at the same step.
Weights move through an actuator (:mod:`lorafleet.rollout.actuators`: the lorafleet
router's route admin API on every replica, listed or found through a Service's
EndpointSlices by :mod:`lorafleet.rollout.discovery`, or an InferenceService's
``canaryTrafficPercent``), and measurements come from the router's ``/metrics`` or
Prometheus (:mod:`lorafleet.rollout.sources`). :mod:`lorafleet.rollout.controller` ties them together;
``lorafleet rollout ...`` and ``kubectl lorafleet canary ...`` drive it (docs/rollout.md).
"""
