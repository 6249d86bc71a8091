/* Written for this build (the upstream project generates it with CMake): a static library. */
#ifndef FACEDETECTION_EXPORT
#define FACEDETECTION_EXPORT
#endif
