from binding.cli import main

raise SystemExit(main())
