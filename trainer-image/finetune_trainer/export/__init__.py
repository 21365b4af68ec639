"""The export stage: the adapter merged and converted to GGUF by llama.cpp, each type checked
against the merged model (parity), Ollama Modelfiles, and the export cache."""
