// Written for this build: the one entry point Rust calls. No C++ exception may cross into
// Rust (an allocation that fails inside the detector would abort the process), so any is
// caught here and reported as -1.
#include "facedetectcnn.h"

extern "C" int liveness_facedetect(unsigned char *result, unsigned char *bgr, int width,
                                   int height, int step) {
    try {
        int *found = facedetect_cnn(result, bgr, width, height, step);
        return found ? *found : -1;
    } catch (...) {
        return -1;
    }
}
