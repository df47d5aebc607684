from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Directory(_message.Message):
    __slots__ = ("directories", "files", "symlinks")
    DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SYMLINKS_FIELD_NUMBER: _ClassVar[int]
    directories: _containers.RepeatedCompositeFieldContainer[DirectoryEntry]
    files: _containers.RepeatedCompositeFieldContainer[FileNode]
    symlinks: _containers.RepeatedCompositeFieldContainer[SymlinkNode]
    def __init__(self, directories: _Optional[_Iterable[_Union[DirectoryEntry, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[FileNode, _Mapping]]] = ..., symlinks: _Optional[_Iterable[_Union[SymlinkNode, _Mapping]]] = ...) -> None: ...

class DirectoryEntry(_message.Message):
    __slots__ = ("name", "digest", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    digest: bytes
    size: int
    def __init__(self, name: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class FileNode(_message.Message):
    __slots__ = ("name", "digest", "size", "executable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTABLE_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    digest: bytes
    size: int
    executable: bool
    def __init__(self, name: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., size: _Optional[int] = ..., executable: _Optional[bool] = ...) -> None: ...

class SymlinkNode(_message.Message):
    __slots__ = ("name", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    target: bytes
    def __init__(self, name: _Optional[bytes] = ..., target: _Optional[bytes] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("directory", "file", "symlink")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    SYMLINK_FIELD_NUMBER: _ClassVar[int]
    directory: DirectoryEntry
    file: FileNode
    symlink: SymlinkNode
    def __init__(self, directory: _Optional[_Union[DirectoryEntry, _Mapping]] = ..., file: _Optional[_Union[FileNode, _Mapping]] = ..., symlink: _Optional[_Union[SymlinkNode, _Mapping]] = ...) -> None: ...

class StatBlobRequest(_message.Message):
    __slots__ = ("digest", "send_chunks", "send_bao")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SEND_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SEND_BAO_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    send_chunks: bool
    send_bao: bool
    def __init__(self, digest: _Optional[bytes] = ..., send_chunks: _Optional[bool] = ..., send_bao: _Optional[bool] = ...) -> None: ...

class StatBlobResponse(_message.Message):
    __slots__ = ("chunks", "bao")
    class ChunkMeta(_message.Message):
        __slots__ = ("digest", "size")
        DIGEST_FIELD_NUMBER: _ClassVar[int]
        SIZE_FIELD_NUMBER: _ClassVar[int]
        digest: bytes
        size: int
        def __init__(self, digest: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BAO_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[StatBlobResponse.ChunkMeta]
    bao: bytes
    def __init__(self, chunks: _Optional[_Iterable[_Union[StatBlobResponse.ChunkMeta, _Mapping]]] = ..., bao: _Optional[bytes] = ...) -> None: ...

class ReadBlobRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    def __init__(self, digest: _Optional[bytes] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class PutBlobResponse(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    def __init__(self, digest: _Optional[bytes] = ...) -> None: ...

class GetDirectoryRequest(_message.Message):
    __slots__ = ("digest", "recursive")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    recursive: bool
    def __init__(self, digest: _Optional[bytes] = ..., recursive: _Optional[bool] = ...) -> None: ...

class PutDirectoryResponse(_message.Message):
    __slots__ = ("root_digest",)
    ROOT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    root_digest: bytes
    def __init__(self, root_digest: _Optional[bytes] = ...) -> None: ...
