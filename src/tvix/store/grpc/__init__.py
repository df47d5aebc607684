"""gRPC for the store layer: ``tvix.store.v1.PathInfoService`` server (the client is
:mod:`tvix.store.pathinfoservice.grpc`)."""

from tvix.store.grpc.pathinfoservice_wrapper import GRPCPathInfoServiceWrapper

__all__ = ["GRPCPathInfoServiceWrapper"]
