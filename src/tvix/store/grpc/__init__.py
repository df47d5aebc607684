"""gRPC for the store layer: the ``tvix.store.v1.PathInfoService`` server.

The client is :mod:`tvix.store.pathinfoservice.grpc`.
"""

from tvix.store.grpc.pathinfoservice_wrapper import GRPCPathInfoServiceWrapper

__all__ = ["GRPCPathInfoServiceWrapper"]
