// llama.cpp's own forward pass on a GGUF: prints the logits of every position of a token sequence.
// Built by tests/test_llama_cpp.py against a llama.cpp tree (LLAMA_CPP_DIR); only llama.h's C API.
//   logits MODEL.gguf TOKEN...   ->  one line per position: n_vocab floats
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s MODEL.gguf TOKEN...\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> tokens;
    for (int i = 2; i < argc; i++) {
        tokens.push_back(std::atoi(argv[i]));
    }
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == nullptr) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch = 64;
    cp.n_ubatch = 64;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        std::fprintf(stderr, "cannot make a context\n");
        return 1;
    }
    llama_batch batch = llama_batch_init((int32_t) tokens.size(), 0, 1);
    for (size_t i = 0; i < tokens.size(); i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int32_t) tokens.size();
    if (llama_decode(ctx, batch) != 0) {
        std::fprintf(stderr, "decode failed\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (size_t i = 0; i < tokens.size(); i++) {
        const float * row = llama_get_logits_ith(ctx, (int32_t) i);
        for (int v = 0; v < n_vocab; v++) {
            std::printf(v ? " %.9g" : "%.9g", row[v]);
        }
        std::printf("\n");
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
